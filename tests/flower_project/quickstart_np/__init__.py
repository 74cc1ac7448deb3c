"""quickstart-np: a Flower app (Message API) in NumPy."""
