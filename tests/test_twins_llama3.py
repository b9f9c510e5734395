"""The scaled twin of the Llama-3.1-8B LoRA recipe (rope scaling llama3, tied to nothing, 128k
vocabulary at full size): see tests/twins.py."""

from twins import check_twin, judge  # noqa: F401 (judge: the served judge fixture on 127.0.0.1)


def test_the_llama3_lora_twin_trains_checkpoints_and_resumes_after_kill_9(tmp_path, judge):  # noqa: F811
    check_twin("llama3_8b_irepo_lora.yaml", tmp_path, judge)
