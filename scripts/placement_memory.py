"""Peak extra memory of a placement per EP rank (issue 22, item 6): see megatron_capaware/tools/bench/placement_memory.py.

    python scripts/placement_memory.py --label after --json docs/results/placement_memory/after.json
    # the old tree: copy the module beside it and run it with PYTHONPATH=<old tree> (docs/placement.md, "Memory")
"""

from megatron_capaware.tools.bench.placement_memory import main

if __name__ == "__main__":
    main()
