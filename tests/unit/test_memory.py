"""GPU memory estimates for QLoRA jobs and choosing GPU classes that fit."""

from __future__ import annotations

import pytest

from app.domain.architectures import ModelKind
from app.domain.memory import (
    AUTO_PACKED_ROWS,
    COLLECTIVE_OVERHEAD_GB,
    ModelShape,
    adapted_matrices,
    auto_parallelism,
    estimate_memory_gb,
    fitting_classes,
    lever_settings,
    micro_tokens,
    parameters_from_shape,
    rank_batch_size,
    shape_from_parameters,
    token_budget,
)

SEVEN_B = shape_from_parameters(7_000_000_000)


def estimate(shape: ModelShape = SEVEN_B, **overrides: int) -> float:
    settings = {"lora_r": 16, "target_modules": 4, "batch_size": 4, "seq_len": 1024}
    return estimate_memory_gb(shape, **(settings | overrides)).total_gb


def test_a_7b_shape_looks_like_llama() -> None:
    assert 28 <= SEVEN_B.num_layers <= 36
    assert 3584 <= SEVEN_B.hidden_size <= 4608
    assert SEVEN_B.vocab_size == 32000


@pytest.mark.parametrize("parameters", [1, 1000, 10**6, 10**13])
def test_layer_count_is_clamped(parameters: int) -> None:
    shape = shape_from_parameters(parameters)
    assert 2 <= shape.num_layers <= 128
    assert shape.hidden_size >= 1


def test_7b_base_weights_take_about_3_and_a_half_gb() -> None:
    result = estimate_memory_gb(SEVEN_B, lora_r=16, target_modules=4, batch_size=1, seq_len=512)
    assert 3.3 <= result.base_weights_gb <= 4.0
    single = estimate_memory_gb(
        SEVEN_B, lora_r=16, target_modules=4, batch_size=1, seq_len=512, double_quant=False
    )
    assert single.base_weights_gb > result.base_weights_gb


def test_lora_term_is_16_bytes_per_adapter_parameter() -> None:
    shape = ModelShape(parameters=10**9, hidden_size=1024, num_layers=8, vocab_size=1000)
    result = estimate_memory_gb(shape, lora_r=8, target_modules=2, batch_size=1, seq_len=1)
    assert result.lora_gb == pytest.approx(2 * 8 * 1024 * 2 * 8 * 16 / 1024**3)


def test_total_grows_with_batch_size_and_sequence_length() -> None:
    assert estimate(batch_size=8) > estimate(batch_size=4)
    assert estimate(seq_len=4096) > estimate(seq_len=1024)
    assert estimate(lora_r=64) > estimate(lora_r=8)


def test_total_is_the_sum_of_the_terms() -> None:
    result = estimate_memory_gb(
        SEVEN_B, lora_r=16, target_modules=4, batch_size=2, seq_len=256, overhead_gb=1.5
    )
    assert result.overhead_gb == 1.5
    assert result.total_gb == pytest.approx(
        result.base_weights_gb + result.lora_gb + result.activations_gb + 1.5
    )


def test_a_zero_batch_size_is_an_error() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        estimate(batch_size=0)


def test_fitting_classes_smallest_first_ties_by_name() -> None:
    classes = {"h100": 80.0, "a10": 24.0, "l4": 24.0, "t4": 16.0, "a100": 80.0}
    assert fitting_classes(20.0, classes) == ["a10", "l4", "a100", "h100"]
    assert fitting_classes(24.0, classes) == ["a10", "l4", "a100", "h100"]
    assert fitting_classes(100.0, classes) == []


# --- Encoders and classifiers ------------------------------------------------------------

BERT_BASE = ModelShape(parameters=110_000_000, hidden_size=768, num_layers=12, vocab_size=30522)


def test_all_linear_adapts_seven_matrices_of_a_decoder_block_and_six_of_an_encoders() -> None:
    assert adapted_matrices(["all-linear"]) == 7
    assert adapted_matrices(["all-linear"], ModelKind.ENCODER) == 6
    assert adapted_matrices(["query", "value"], ModelKind.ENCODER) == 2


def test_a_classifier_has_no_vocabulary_logits_term() -> None:
    settings = {"lora_r": 8, "target_modules": 2, "batch_size": 32, "seq_len": 128}
    generating = estimate_memory_gb(BERT_BASE, **settings)
    classifying = estimate_memory_gb(BERT_BASE, **settings, classification=True)
    logits_gb = 32 * 128 * 30522 * 4 * 2 / 1024**3
    assert generating.activations_gb - classifying.activations_gb == pytest.approx(logits_gb)
    # Its head (one hidden x hidden layer) is trained in full, with the adapters.
    head_gb = 768 * 768 * 16 / 1024**3
    assert classifying.lora_gb - generating.lora_gb == pytest.approx(head_gb)


def test_an_encoder_classifier_needs_less_than_a_causal_model_of_the_same_shape() -> None:
    def total(kind: ModelKind, classification: bool) -> float:
        return estimate_memory_gb(
            BERT_BASE,
            lora_r=8,
            target_modules=adapted_matrices(["all-linear"], kind),
            batch_size=32,
            seq_len=512,
            classification=classification,
        ).total_gb

    assert total(ModelKind.ENCODER, True) < total(ModelKind.CAUSAL, False)


def test_parameters_from_a_config_shape_match_the_known_models() -> None:
    bert = parameters_from_shape(
        "encoder", hidden_size=768, num_layers=12, vocab_size=30522, intermediate_size=3072
    )
    assert 100e6 <= bert <= 115e6  # bert-base-uncased: 110M
    llama = parameters_from_shape(
        "causal", hidden_size=4096, num_layers=32, vocab_size=32000, intermediate_size=11008
    )
    assert 6.5e9 <= llama <= 7e9  # Llama 2 7B: 6.74B


# --- the GPU levers (training.micro_batch_tokens, attention, liger) ----------------------

LLAMA_8B = ModelShape(
    parameters=8_000_000_000,
    hidden_size=4096,
    num_layers=32,
    vocab_size=128256,
    intermediate_size=14336,
)
LEVER_SETTINGS = {"lora_r": 16, "target_modules": 7, "batch_size": 16, "seq_len": 2048}


def levers(**overrides) -> float:
    return estimate_memory_gb(LLAMA_8B, **(LEVER_SETTINGS | overrides)).activations_gb


@pytest.mark.parametrize(
    ("budget", "tokens"),
    [
        (None, 16 * 2048),  # no budget: the whole batch at once
        (8192, 8192),
        (100, 2048),  # a micro-batch holds at least one example
        (10**7, 16 * 2048),  # and at most the batch
    ],
)
def test_micro_batch_tokens_size_the_activations(budget: int | None, tokens: int) -> None:
    assert micro_tokens(16, 2048, budget) == tokens
    per_token = levers(micro_batch_tokens=4096) / 4096
    assert levers(micro_batch_tokens=budget) == pytest.approx(per_token * tokens, rel=1e-9)


def test_fused_loss_drops_the_vocabulary_logits() -> None:
    tokens = LEVER_SETTINGS["batch_size"] * LEVER_SETTINGS["seq_len"]
    saved = (levers() - levers(fused_loss=True)) * 1024**3
    # fp32 logits and their gradient over 128k entries, less a hidden-sized chunk per token.
    assert saved == pytest.approx(tokens * (128256 * 8 - 4096 * 8), rel=1e-9)
    assert levers(fused_loss=True) < levers() / 2


def test_a_packed_row_under_sdpa_costs_a_quadratic_mask_and_varlen_kernels_none() -> None:
    row = 16 * 2048
    plain = levers(packed=True, attention="flash_attention_2")
    assert levers(packed=True, attention="flex_attention") == plain
    sdpa = levers(packed=True, attention="sdpa") - plain
    assert sdpa * 1024**3 == pytest.approx(3 * row**2)
    # Padded rows of seq_len under SDPA: one mask per row, 16 x 2048², far less.
    padded = levers(attention="sdpa") - levers(attention="flex_attention")
    assert padded * 1024**3 == pytest.approx(3 * 16 * 2048**2)
    # Eager keeps the scores of its 32 heads (4096 / 128); one layer at a time when checkpointed.
    eager = levers(packed=True, attention="eager", gradient_checkpointing=True) - plain
    assert eager * 1024**3 == pytest.approx(6 * 32 * row**2)


def test_token_budget_is_the_largest_micro_batch_that_fits() -> None:
    settings = {"lora_r": 16, "target_modules": 7, "packed": True, "attention": "flex_attention"}
    budget = token_budget(LLAMA_8B, 80, seq_len=2048, batch_size=256, **settings)

    def total(tokens: int) -> float:
        return estimate_memory_gb(
            LLAMA_8B, batch_size=256, seq_len=2048, micro_batch_tokens=tokens, **settings
        ).total_gb

    assert 2048 < budget < 256 * 2048
    assert total(budget) <= 0.9 * 80 < total(budget + 1)
    fused = token_budget(LLAMA_8B, 80, seq_len=2048, batch_size=256, fused_loss=True, **settings)
    assert fused > 2 * budget, "without the logits far more tokens fit"
    # Bounded by one example and by the whole batch.
    assert token_budget(LLAMA_8B, 6, seq_len=2048, batch_size=256, **settings) == 2048
    assert token_budget(LLAMA_8B, 1000, seq_len=2048, batch_size=4, **settings) == 4 * 2048


def test_lever_settings_read_a_jobs_training_options_erring_large() -> None:
    defaults = {"packing": True, "attention": "auto", "liger": "auto", "micro_batch_tokens": "auto"}
    assert lever_settings(defaults, seq_len=2048) == {
        "packed": True,
        "attention": "flex_attention",  # flash or flex on a GPU: no quadratic mask either way
        "fused_loss": False,  # auto may not apply to the model: the logits are counted
        "micro_batch_tokens": AUTO_PACKED_ROWS * 2048,  # what the worker wants
    }
    chosen = defaults | {"attention": "sdpa", "liger": True, "micro_batch_tokens": 4096}
    assert lever_settings(chosen, seq_len=2048) == {
        "packed": True,
        "attention": "sdpa",
        "fused_loss": True,
        "micro_batch_tokens": 4096,
    }
    padded = lever_settings(defaults | {"packing": False}, seq_len=2048)
    assert padded["attention"] == "sdpa" and not padded["packed"]
    assert padded["micro_batch_tokens"] is None, "auto: a padded batch whole"
    classifier = lever_settings(defaults | {"liger": True}, seq_len=512, classification=True)
    assert not classifier["packed"] and not classifier["fused_loss"]
    # A job stored before the options kept sdpa; its packed micro-batch is one row.
    assert lever_settings({}, seq_len=1024) == {
        "packed": True,
        "attention": "sdpa",
        "fused_loss": False,
        "micro_batch_tokens": AUTO_PACKED_ROWS * 1024,
    }
    # The keywords go straight into the estimate: a packed default job needs one row's
    # activations, not the whole batch's.
    whole = estimate_memory_gb(LLAMA_8B, **LEVER_SETTINGS)
    levers = lever_settings(defaults, seq_len=2048)
    default = estimate_memory_gb(LLAMA_8B, **LEVER_SETTINGS, **levers)
    assert default.activations_gb < whole.activations_gb / 8


# --- multi-GPU jobs: figures per GPU --------------------------------------------------------

MULTI = {"lora_r": 16, "target_modules": 7, "batch_size": 8, "seq_len": 2048}


def per_gpu(**overrides):
    return estimate_memory_gb(LLAMA_8B, **(MULTI | overrides))


def test_one_gpu_gives_the_same_figures_whatever_the_parallelism() -> None:
    alone = per_gpu()
    assert per_gpu(gpus=1, parallelism="ddp") == alone
    assert per_gpu(gpus=1, parallelism="fsdp") == alone


def test_ddp_holds_the_whole_model_on_each_gpu_and_a_share_of_the_batch() -> None:
    alone, ddp = per_gpu(), per_gpu(gpus=4, parallelism="ddp")
    assert ddp.base_weights_gb == alone.base_weights_gb
    # The trained parameters once more in fp32 for the all-reduce buckets: 16 + 4 bytes.
    assert ddp.lora_gb == pytest.approx(alone.lora_gb * 20 / 16)
    # Two of the eight examples per GPU.
    assert ddp.activations_gb == pytest.approx(per_gpu(batch_size=2).activations_gb)
    assert ddp.overhead_gb == alone.overhead_gb + COLLECTIVE_OVERHEAD_GB


def test_fsdp_shards_weights_and_trained_state_and_gathers_two_blocks() -> None:
    alone, fsdp = per_gpu(), per_gpu(gpus=4, parallelism="fsdp")
    block = alone.base_weights_gb / LLAMA_8B.num_layers
    assert fsdp.base_weights_gb == pytest.approx(alone.base_weights_gb / 4 + 2 * block)
    assert fsdp.lora_gb == pytest.approx(alone.lora_gb / 4)
    assert fsdp.activations_gb == per_gpu(gpus=4, parallelism="ddp").activations_gb
    assert fsdp.total_gb < per_gpu(gpus=4, parallelism="ddp").total_gb


def test_fsdp_never_counts_more_than_the_whole_base() -> None:
    two_layers = ModelShape(parameters=10**9, hidden_size=1024, num_layers=2, vocab_size=1000)
    alone = estimate_memory_gb(two_layers, **MULTI)
    fsdp = estimate_memory_gb(two_layers, **MULTI, gpus=2, parallelism="fsdp")
    assert fsdp.base_weights_gb == alone.base_weights_gb


def test_an_unknown_parallelism_or_zero_gpus_is_an_error() -> None:
    with pytest.raises(ValueError, match="parallelism"):
        per_gpu(gpus=2, parallelism="tensor")
    with pytest.raises(ValueError, match="gpus"):
        per_gpu(gpus=0)


def test_a_gpus_share_of_an_uneven_batch_is_rounded_up() -> None:
    assert rank_batch_size(8, 4) == 2
    assert rank_batch_size(9, 4) == 3
    assert rank_batch_size(1, 8) == 1


def test_token_budget_of_a_multi_gpu_job_is_bounded_by_one_gpus_share() -> None:
    settings = {"lora_r": 16, "target_modules": 7, "packed": True, "attention": "flex_attention"}
    share = token_budget(LLAMA_8B, 1000, seq_len=2048, batch_size=8, gpus=4, **settings)
    assert share == 2 * 2048


def test_auto_parallelism_is_ddp_while_it_fits_the_largest_class() -> None:
    assert auto_parallelism(30.0, 80.0, fsdp_allowed=True) == "ddp"
    assert auto_parallelism(80.0, 80.0, fsdp_allowed=True) == "ddp"
    assert auto_parallelism(90.0, 80.0, fsdp_allowed=True) == "fsdp"
    assert auto_parallelism(90.0, 80.0, fsdp_allowed=False) == "ddp"
    assert auto_parallelism(90.0, None, fsdp_allowed=True) == "ddp", "no class known yet"
