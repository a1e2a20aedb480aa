from lafite_core.config import SearchConfig
from lafite_core.method.search import search_hyperparameters


def test_tau_first_without_editing_then_k_at_that_tau():
    calls = []

    def evaluate(tau, k):
        calls.append((tau, k))
        if k is None:
            return {50: 0.7, 100: 0.9, 200: 0.9, 300: 0.6}[tau], 0.5
        return {1: 0.8, 3: 0.95, 5: 0.93}[k], 0.6

    r = search_hyperparameters(evaluate, SearchConfig(taus=(50, 100, 200, 300), ks=(1, 3, 5)))
    assert (r.tau, r.k) == (100, 3)  # tie between 100 and 200 goes to the earlier entry
    assert calls == [(50, None), (100, None), (200, None), (300, None), (100, 1), (100, 3), (100, 5)]
    assert [p.stage for p in r.points] == ["tau"] * 4 + ["k"] * 3
    assert r.points[5].image_auroc == 0.95
