"""Edge agent: serves expert FFN calls of a split MoE model over ZeroMQ (see protocol.py)."""
