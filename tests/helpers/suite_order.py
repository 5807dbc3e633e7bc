"""The order in which `make test` hands test modules to its workers (tests/conftest.py)."""

# The modules that take longest (seconds of test time in CI on 2 cores with three workers, the
# mean of two runs at 38ec04b and cd0c76d), longest first. `make test` hands whole modules to
# its workers in collection order (`--dist loadfile --no-loadscope-reorder`); xdist's own
# order puts the modules with the fewest tests last, so one worker ran the longest
# single-test modules (the team walkthrough, the promotion race) alone at the end while the
# others waited.
LONGEST_FIRST = (
    "tests/pipeline/test_reliability.py",  # 306
    "tests/pipeline/test_champion_stage.py",  # 186
    "tests/team/test_walkthrough.py",  # 183
    "tests/training/test_train.py",  # 180
    "tests/team/test_faults.py",  # 164
    "tests/pipeline/test_pipeline.py",  # 147
    "tests/evaluation/test_review.py",  # 113
    "tests/pipeline/test_benchmark.py",  # 95
    "tests/team/test_gate_service.py",  # 92
    "tests/team/test_promotion_race.py",  # 88
    "tests/evaluation/test_promotion.py",  # 78
    "tests/sweep/test_sweep.py",  # 72
    "tests/training/test_multi_worker.py",  # 71
    "tests/team/test_shared_sweep.py",  # 59
    "tests/training/test_startup.py",  # 40
    "tests/team/test_network_stack.py",  # 33
    "tests/evaluation/test_rollback.py",  # 33
    "tests/tracking/test_lineage.py",  # 32
)
