"""Planning a cluster run without the cluster: per-GPU memory and step time of every layout.

`sf-plan` (launch/plan.py) and the dry run (`trainer.dry_run=true`, planner/dry_run.py) use
the same pieces: the bytes of parameters, gradients and optimizer state counted from the
trainer's own sharded model (built on the meta device; planner/shards.py), the activation
estimate (planner/activations.py), the communication buffers (planner/buffers.py), the
step-time model (planner/step_time.py) over a GPU table (planner/hardware.py), the
enumeration of layouts (planner/search.py) and sf-plan's table (planner/table.py).
"""
