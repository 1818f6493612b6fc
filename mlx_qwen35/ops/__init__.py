"""The kernels under the model graph."""
