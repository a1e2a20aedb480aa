import pytest
from pydantic import ValidationError

from lafite_core.config import SearchConfig
from lafite_core.method.search import search_hyperparameters
from lafite_core.store.tables import search_table


def test_tau_first_without_editing_then_k_at_that_tau():
    calls = []

    def evaluate(tau, k, steps):
        calls.append((tau, k, steps))
        if k is None:
            return {50: 0.7, 100: 0.9, 200: 0.9, 300: 0.6}[tau], 0.5
        return {1: 0.8, 3: 0.95, 5: 0.93}[k], 0.6

    r = search_hyperparameters(evaluate, SearchConfig(taus=(50, 100, 200, 300), ks=(1, 3, 5)), ddim_steps=4)
    assert (r.tau, r.k, r.ddim_steps) == (100, 3, 4)  # tie between 100 and 200 goes to the earlier entry
    assert calls == [(50, None, 4), (100, None, 4), (200, None, 4), (300, None, 4), (100, 1, 4), (100, 3, 4),
                     (100, 5, 4)]
    assert [p.stage for p in r.points] == ["tau"] * 4 + ["k"] * 3
    assert r.points[5].image_auroc == 0.95
    assert all(p.seconds >= 0 for p in r.points)


@pytest.mark.parametrize("tolerance, chosen", [(0.005, 3), (0.0, 5), (0.05, 1)])
def test_steps_keep_the_fewest_within_the_tolerance_of_the_best(tolerance, chosen):
    calls = []
    steps_auroc = {1: 0.90, 2: 0.93, 3: 0.946, 5: 0.95, 10: 0.949}

    def evaluate(tau, k, steps):
        calls.append((tau, k, steps))
        if k is None:
            return {50: 0.9, 100: 0.8}[tau], 0.5
        return ({1: 0.7, 3: 0.90}[k] if steps == 1 else steps_auroc[steps]), 0.6

    cfg = SearchConfig(taus=(50, 100), ks=(1, 3), ddim_steps=(5, 2, 3, 1, 10), steps_tolerance=tolerance)
    r = search_hyperparameters(evaluate, cfg, ddim_steps=5)
    assert (r.tau, r.k, r.ddim_steps) == (50, 3, chosen)
    # tau and K are searched at the fewest steps of the list (1, not the profile's 5), and that point
    # is not scored again in the steps stage
    assert calls[:4] == [(50, None, 1), (100, None, 1), (50, 1, 1), (50, 3, 1)]
    assert calls[4:] == [(50, 3, 5), (50, 3, 2), (50, 3, 3), (50, 3, 10)]
    steps = [p for p in r.points if p.stage == "steps"]
    assert [p.ddim_steps for p in steps] == [5, 2, 3, 1, 10]
    assert steps[3].image_auroc == 0.90 and steps[3].seconds == 0.0
    table = search_table(r).to_pylist()
    assert [(row["stage"], row["ddim_steps"]) for row in table if row["chosen"]] == [
        ("tau", 1), ("k", 1), ("steps", chosen)]
    assert {"seconds", "ddim_steps"} <= set(table[0])


@pytest.mark.parametrize("patience, scored, chosen", [
    (1, [2], 1),  # 2 steps do not beat 1 by more than the tolerance: nothing dearer is scored
    (2, [2, 3, 5, 10], 3),  # 3 beats the best by more than the tolerance and restarts the count; 20 never runs
    (0, [5, 2, 3, 10, 20], 20),  # no patience: every count in the given order, and the late jump is found
])
def test_steps_patience_stops_before_the_dearest_counts(patience, scored, chosen):
    steps_auroc = {1: 0.90, 2: 0.902, 3: 0.95, 5: 0.951, 10: 0.952, 20: 0.99}
    calls = []

    def evaluate(tau, k, steps):
        calls.append(steps)
        if k is None:
            return 0.8, 0.5
        return (0.90 if steps == 1 else steps_auroc[steps]), 0.6

    cfg = SearchConfig(taus=(50,), ks=(3,), ddim_steps=(5, 2, 3, 1, 10, 20), steps_patience=patience)
    r = search_hyperparameters(evaluate, cfg, ddim_steps=5)
    assert calls[2:] == scored  # after the tau and K points (at 1 step)
    assert r.ddim_steps == chosen
    # every scored count is recorded (the reused 1-step point too), none that was skipped
    assert sorted(p.ddim_steps for p in r.points if p.stage == "steps") == sorted([1, *scored])


def test_the_cpu_profile_stops_its_steps_stage_early():
    from lafite_core.config import load_profile

    assert load_profile("cpu").search.steps_patience == 1
    assert load_profile("paper").search.steps_patience == 0


def test_the_cpu_profile_searches_a_subset_and_the_paper_profile_every_image():
    from lafite_core.config import load_profile

    assert load_profile("cpu").search.images_per_category == 128
    assert load_profile("paper").search.images_per_category is None


def test_step_counts_must_be_positive():
    with pytest.raises(ValidationError, match="DDIM step count"):
        SearchConfig(ddim_steps=(0, 2))


def test_search_subset_caps_each_category_and_keeps_its_share_of_anomalies():
    import numpy as np

    from lafite_core.stages import search_subset

    labels = np.array([0] * 30 + [1] * 60 + [0] * 4 + [1] * 8)
    cats = np.array(["d/big"] * 90 + ["d/small"] * 12)
    sub = search_subset(labels, cats, 24, seed=0)
    assert np.all(np.diff(sub) > 0)  # sorted, no image twice
    big, small = sub[cats[sub] == "d/big"], sub[cats[sub] == "d/small"]
    assert len(big) == 24 and labels[big].sum() == 16  # two anomalies a normal, as in the category
    np.testing.assert_array_equal(small, np.arange(90, 102))  # a category under the cap is kept whole
    np.testing.assert_array_equal(search_subset(labels, cats, 24, seed=0), sub)  # seeded
    assert not np.array_equal(search_subset(labels, cats, 24, seed=1), sub)
    np.testing.assert_array_equal(search_subset(labels, cats, None, seed=0), np.arange(102))
    # a rare label keeps at least one image, so every category's AUROC stays defined
    rare = search_subset(np.array([1] + [0] * 99), np.array(["d/c"] * 100), 10, seed=3)
    assert len(rare) == 10 and 0 in rare
    rare = search_subset(np.array([0] + [1] * 99), np.array(["d/c"] * 100), 10, seed=3)
    assert len(rare) == 10 and 0 in rare
    one_label = search_subset(np.zeros(50, int), np.array(["d/c"] * 50), 10, seed=3)  # no AUROC, still capped
    assert len(one_label) == 10 and len(set(one_label)) == 10


def test_the_evaluator_refuses_a_subset_out_of_order():
    import numpy as np

    from lafite_core.stages import PseudoEvaluator, PseudoValidation

    pseudo = PseudoValidation(np.zeros((4, 2, 2, 2), np.float32), np.array([0, 0, 1, 1]), np.zeros((4, 8, 8), bool),
                              np.array(["d/c"] * 4), [0, 1, 2, 3])
    for bad in ([1, 0, 2, 3], [0, 0, 1], [0, 4]):
        with pytest.raises(ValueError, match="increasing indices"):
            PseudoEvaluator(None, pseudo, subset=np.array(bad))


def test_search_table_records_the_images_each_point_was_scored_on():
    import dataclasses

    r = search_hyperparameters(lambda tau, k, steps: (0.9, 0.8), SearchConfig(taus=(50,), ks=(1,)), ddim_steps=1)
    assert {row["images"] for row in search_table(r).to_pylist()} == {None}
    assert {row["images"] for row in search_table(dataclasses.replace(r, images=40)).to_pylist()} == {40}


def test_images_per_category_is_at_least_four():
    with pytest.raises(ValidationError):
        SearchConfig(images_per_category=3)
