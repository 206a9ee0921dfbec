"""The TTP side of NLPS1: the reference TTP service, its keys, its HTTP client and the backend interface."""
