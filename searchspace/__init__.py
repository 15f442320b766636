"""What can be built: the architecture type, the space of choices, and building a student."""
