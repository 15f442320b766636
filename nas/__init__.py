"""How to choose: search strategies, study storage, export."""
