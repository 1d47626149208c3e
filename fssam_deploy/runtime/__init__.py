"""Runners (one contract for every backend) and the episode orchestration over them."""
