"""Parameter-efficient fine-tuning: LoRA (with PEFT-format files) and a linear probe."""

from minift.peft.lora import LoraConfig, LoraLinear
from minift.peft.peft_model import PeftModel, get_peft_model
from minift.peft.probe import LinearProbe, extract_features, probe_accuracy, train_probe

__all__ = ["LinearProbe", "LoraConfig", "LoraLinear", "PeftModel", "extract_features", "get_peft_model",
           "probe_accuracy", "train_probe"]
