"""sftjob run's eval table: base / SFT / aligned columns when the run aligned (eval/results.json has "sft")."""

from sftjob_operator.local import report

ALIGNED = {
    "base": {"exact_match": 0.0, "chosen_logp_accuracy": 0.5},
    "sft": {"exact_match": 0.84375, "chosen_logp_accuracy": 0.5, "reward_margin": 0.0},
    "trained": {"exact_match": 0.8125, "chosen_logp_accuracy": 0.90625, "preference_accuracy": 0.9375},
}


def test_an_aligned_run_shows_base_sft_and_aligned_and_the_change_from_sft() -> None:
    assert report.eval_header(ALIGNED) == ("metric", "base model", "SFT", "aligned", "aligned vs SFT")
    rows = {r[0]: r[1:] for r in report.eval_table(ALIGNED)}
    assert rows["exact match"] == ("0.0%", "84.4%", "81.2%", "-3.1 pts")
    assert rows["prefers chosen (log-prob)"] == ("50.0%", "50.0%", "90.6%", "+40.6 pts")
    assert rows["preference accuracy (reward)"] == ("-", "-", "93.8%", "-")


def test_a_run_without_alignment_keeps_base_and_fine_tuned() -> None:
    plain = {"base": ALIGNED["base"], "trained": ALIGNED["sft"]}
    assert report.eval_header(plain) == ("metric", "base model", "fine-tuned", "change")
    rows = {r[0]: r[1:] for r in report.eval_table(plain)}
    assert rows["exact match"] == ("0.0%", "84.4%", "+84.4 pts")
