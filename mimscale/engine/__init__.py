"""The DeepSpeed training engine: distributed setup, optimizer/schedule, checkpoints, the loop.

Import-light: deepspeed is imported only when an engine is built.
"""
