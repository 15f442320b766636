"""tacnas: task-adaptive compression of BERT-family models by neural architecture search.

The packages live in the repository's top-level folders (``searchspace/``, ``evaluators/``,
``nas/``) and are installed under this one name (``tacnas.searchspace``, ``tacnas.evaluators``,
``tacnas.nas``), so they cannot collide with other packages of a user's environment.
"""

__version__ = "0.1.0"
