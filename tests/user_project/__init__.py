"""A user's project as Lightning's documentation writes it: nothing here knows about ensembles."""
