"""The lightweight scorer: onnxruntime + numpy + pyarrow, nothing else.

This package must import and score without torch, torchrec, polars or mlflow installed
(tests/test_serving_light.py enforces it). It depends on nothing of funnelrank's but the
exported bundle format; `features` imports its id encoding from here, so training and
serving encode ids with the very same code.
"""
