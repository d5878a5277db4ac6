"""The reference: ZeroPur's losses, step rules and graph functions in torch, the torch runner, and the reference
purifier every backend is checked against."""
