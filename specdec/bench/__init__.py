"""`specdec bench`: Spec-Bench speed and acceptance of the plain, speculative and peer paths in one process."""
