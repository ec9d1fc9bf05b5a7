"""The training side of ATP: the generator, its controller, the group lasso, calibration, data parallel and checkpoint state."""
