"""layerswarm: run a large language model on a swarm of machines, each serving a span of layers."""

__version__ = "0.1.0"
