"""Tasks run by the engine (pretraining) and evaluations (retrieval); import the submodules."""
