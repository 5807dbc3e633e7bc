"""The order in which `make test` hands test modules to its workers (tests/conftest.py)."""

# The modules that take longest (seconds of test time on 2 cores with three workers, one run
# of the whole suite on a 2-core AMD EPYC), longest first. `make test` hands whole modules to
# its workers in collection order (`--dist loadfile --no-loadscope-reorder`); xdist's own
# order puts the modules with the fewest tests last, so one worker ran the longest
# single-test modules (the team walkthrough, the promotion race) alone at the end while the
# others waited.
LONGEST_FIRST = (
    "tests/team/test_walkthrough.py",  # 177
    "tests/pipeline/test_reliability.py",  # 171
    "tests/training/test_train.py",  # 159
    "tests/team/test_faults.py",  # 149
    "tests/pipeline/test_champion_stage.py",  # 144
    "tests/pipeline/test_pipeline.py",  # 117
    "tests/evaluation/test_review.py",  # 93
    "tests/team/test_promotion_race.py",  # 93
    "tests/team/test_gate_service.py",  # 82
    "tests/pipeline/test_benchmark.py",  # 79
    "tests/sweep/test_sweep.py",  # 72
    "tests/training/test_multi_worker.py",  # 70
    "tests/evaluation/test_promotion.py",  # 70
    "tests/team/test_shared_sweep.py",  # 53
    "tests/team/test_network_stack.py",  # 39
    "tests/evaluation/test_rollback.py",  # 28
    "tests/team/test_monitoring_team.py",  # 27
    "tests/tracking/test_logged_models.py",  # 24
)
