"""OpenCL C 1.2 kernel sources (*.cl), installed as package data of `polaris_opt.kernels`."""
