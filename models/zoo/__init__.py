"""Builders for the polaris-opt model zoo (see models/build_zoo.py and models/README.md).

Everything here is plain NumPy and `onnx.helper`: no deep-learning framework is needed to
rebuild the zoo, and a given seed always gives byte-identical files on one machine.
"""
