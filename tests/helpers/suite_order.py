"""The order in which `make test` hands test modules to its workers (tests/conftest.py)."""

# The modules that take longest (seconds of test time in CI on 2 cores, at 9f01682), longest
# first. `make test` hands whole modules to its workers in collection order
# (`--dist loadfile --no-loadscope-reorder`); xdist's own order puts the modules with the
# fewest tests last, so one worker ran the longest single-test modules (the team
# walkthrough, the promotion race) alone at the end while the others waited.
LONGEST_FIRST = (
    "tests/pipeline/test_reliability.py",  # 236
    "tests/team/test_gate_service.py",  # 167
    "tests/training/test_train.py",  # 140
    "tests/team/test_walkthrough.py",  # 136
    "tests/team/test_faults.py",  # 136
    "tests/pipeline/test_champion_stage.py",  # 117
    "tests/pipeline/test_benchmark.py",  # 89
    "tests/team/test_promotion_race.py",  # 85
    "tests/pipeline/test_pipeline.py",  # 82
    "tests/evaluation/test_review.py",  # 73
    "tests/training/test_multi_worker.py",  # 69
    "tests/evaluation/test_promotion.py",  # 63
    "tests/sweep/test_sweep.py",  # 60
    "tests/team/test_shared_sweep.py",  # 47
    "tests/tracking/test_lineage.py",  # 28
    "tests/training/test_startup.py",  # 27
    "tests/team/test_network_stack.py",  # 26
)
