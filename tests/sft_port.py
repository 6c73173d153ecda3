"""Turn TRL's own `trl/scripts/sft.py` into a distillation script by changing only the import, the config class and
the trainer call (which gains `teacher_model=`). Used by the test that proves the drop-in claim."""

from __future__ import annotations

SUBSTITUTIONS = (
    (
        "from trl import SFTTrainer, get_dataset, get_peft_config, get_quantization_config",
        "from trl import get_dataset, get_peft_config, get_quantization_config\n\n"
        "    from hf_distill import DistillationTrainer",
    ),
    (
        "trainer = SFTTrainer(\n",
        "trainer = DistillationTrainer(\n        teacher_model=training_args.teacher_model_name_or_path,\n",
    ),
    (
        "from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser",
        "from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser\n\n"
        "    from hf_distill import DistillationConfig",
    ),
    (
        "dataclass_types = (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig)",
        "dataclass_types = (ScriptArguments, DistillationConfig, ModelConfig, DatasetMixtureConfig)",
    ),
)


def port_sft_script(source: str) -> str:
    """Apply `SUBSTITUTIONS` to the source of `trl/scripts/sft.py`; each must match exactly once."""
    for old, new in SUBSTITUTIONS:
        count = source.count(old)
        if count != 1:
            raise AssertionError(f"expected exactly one {old!r} in trl/scripts/sft.py, found {count}")
        source = source.replace(old, new)
    return source
