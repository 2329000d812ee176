"""cifarlab: the classic CIFAR-10 experiments end to end (training, DP-SGD, SGLD uncertainty, class-incremental
learning) from one command or a small typed library. `cifarlab --help` lists the commands."""

__version__ = "0.2.0"
