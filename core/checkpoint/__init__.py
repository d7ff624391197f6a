"""Sharded, reshardable, atomic checkpoints with `torch.distributed.checkpoint` (DCP), one
module per job:

    paths.py          where checkpoints live; which one a run resumes from; pruning
    safe_load.py      reading a checkpoint without running code from it; checks before loading
    atomic_write.py   the one atomic write (partial directory, complete.json last, rename)
    state.py          model and optimizer state keyed by parameter FQN
    stateful.py       the random generators and the fp16 loss scale as Stateful parts
    checkpointer.py   `Checkpointer`: saves and resumes a run from the parts it is given
    weights.py        weights only: `trainer.init_from` and sf-convert's checkpoints
"""
