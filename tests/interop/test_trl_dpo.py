"""minift's DPO against TRL's DPOTrainer: the same LoRA model, the same token ids -> the same
loss, reward metrics and adapter gradients.

TRL builds the batch (its tokenization: prompt and prompt + completion tokenized apart, EOS
appended to each answer, completion = where the two diverge; its collator: chosen rows above
rejected rows, right padding, a ``completion_mask``) and minift gets exactly those ids, turned
into its pre-shifted labels: ``labels[t]`` is token t+1 where token t+1 is a completion token,
-100 elsewhere. The reference on both sides is the base with the adapter switched off: TRL's
path when it wraps the model itself (``peft_config=``), minift's ``reference="disabled_adapter"``.
The adapter gets a random B *after* TRL has wrapped it, so policy != reference and the rewards
and gradients are not trivial; it reaches minift through a PEFT adapter folder. The last test
starts from an adapter that is already trained instead: TRL's reference is then a frozen copy
of it, minift's ``reference="auto"`` precomputes it.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="interop extra not installed (pip install -e '.[interop]')")
peft = pytest.importorskip("peft", reason="interop extra not installed")
trl = pytest.importorskip("trl", reason="interop extra not installed")
datasets = pytest.importorskip("datasets", reason="interop extra not installed")
tokenizers = pytest.importorskip("tokenizers", reason="interop extra not installed")

import transformers  # noqa: E402
from hf import hf_twin, minift_model  # noqa: E402

from minift.backend import to_numpy  # noqa: E402
from minift.data.loader import DataLoader  # noqa: E402
from minift.data.preference import collate_pairs  # noqa: E402
from minift.peft import PeftModel  # noqa: E402
from minift.training.dpo import DPOTrainer  # noqa: E402
from minift.training.trainer import TrainConfig  # noqa: E402

pytestmark = pytest.mark.interop
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BETA = 0.5
PAIRS = [
    {"prompt": "how long do i have to report a claim ?",
     "chosen": " report it within thirty days .", "rejected": " there is no deadline ."},
    {"prompt": "is my bike covered ?",
     "chosen": " yes , up to the limit of your policy .", "rejected": " no ."},
    {"prompt": "can i pay monthly ?",
     "chosen": " yes , monthly or yearly .", "rejected": " only yearly , sorry , that is the rule ."},
]


def word_tokenizer():
    """A word-level fast tokenizer over the words of ``PAIRS`` (ids < the tiny model's 64) that
    adds a BOS like Llama's tokenizers do; ``</s>`` is a special token, so the EOS TRL glues onto
    each answer splits off."""
    words = sorted({w for pair in PAIRS for text in pair.values() for w in text.split()})
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    assert len(vocab) <= 64, len(vocab)
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    raw.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")


def randomize_lora_b(model):
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.default" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def trl_trainer(tmp_path, loss_type, wrapped_by):
    """TRL's DPOTrainer on the tiny Llama with a LoRA adapter whose B is random.

    ``wrapped_by="trl"``: TRL wraps the model in a fresh adapter itself (``peft_config=``), so its
    reference is the adapter switched off; B is randomized afterwards, so policy != reference.
    ``wrapped_by="user"``: the model comes already wrapped, its adapter trained (random B); TRL
    then keeps a frozen copy of the adapter, named "ref", as the reference (trl#4723's fix).
    """
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=BETA, loss_type=loss_type, max_length=32,
                         per_device_train_batch_size=len(PAIRS), report_to="none", use_cpu=True, bf16=False,
                         fp16=False, save_strategy="no", eval_strategy="no")
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = hf_twin(minift_model())
    if wrapped_by == "user":
        model = peft.get_peft_model(model, lora)
        randomize_lora_b(model)
    trainer = trl.DPOTrainer(model=model, args=args, processing_class=word_tokenizer(),
                             train_dataset=datasets.Dataset.from_list(PAIRS),
                             peft_config=lora if wrapped_by == "trl" else None)
    assert ("ref" in trainer.model.peft_config) == (wrapped_by == "user")
    if wrapped_by == "trl":
        randomize_lora_b(trainer.model)
    return trainer


class TokenPairs:
    """minift's preference items made from TRL's collated batch: per pair, the chosen and rejected
    rows as ``(input_ids, labels)`` with labels pre-shifted and only on TRL's completion tokens."""

    def __init__(self, batch):
        ids, real = batch["input_ids"].numpy(), batch["attention_mask"].numpy().astype(bool)
        completion = batch["completion_mask"].numpy().astype(bool)
        rows = []
        for row in range(len(ids)):
            n = real[row].sum()
            labels = np.where(completion[row, 1:n], ids[row, 1:n], -100)
            rows.append({"input_ids": ids[row, :n - 1], "labels": labels})
        half = len(rows) // 2
        self.examples = [{"chosen": rows[i], "rejected": rows[half + i]} for i in range(half)]
        self.reference_logprobs = None

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        item = {**self.examples[i], "index": i}
        if self.reference_logprobs is not None:  # filled in by minift's DPOTrainer when it precomputes
            item["reference_logprobs"] = self.reference_logprobs[i]
        return item


def trl_loss(trainer, batch):
    """TRL's loss on ``batch``, backpropagated: (loss, its train metrics, LoRA gradients by name)."""
    model = trainer.model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    grads = {name.replace(".default.", "."): p.grad.numpy().copy() for name, p in model.named_parameters()
             if ".default." in name}  # not the frozen "ref" copy
    return loss.item(), metrics, grads


def minift_loss(adapter_folder, pairs, pad_id, loss_type, tmp_path, reference):
    """minift's DPO loss on the same pairs through ``DPOTrainer.pair_loss`` (collate_pairs,
    sequence_logprobs, the reference ``reference`` resolves to, PreferenceLoss), backpropagated."""
    model = PeftModel.from_pretrained(minift_model(), adapter_folder)
    loader = DataLoader(pairs, batch_size=len(pairs), shuffle=False, pad_id=pad_id, collate_fn=collate_pairs)
    config = TrainConfig(max_steps=1, out_dir=str(tmp_path / "minift"), progress=False, plot=False)
    trainer = DPOTrainer(model, config, loader, beta=BETA, loss_type=loss_type, reference=reference)
    batch = next(iter(loader))
    loss, metrics = trainer.pair_loss(model, batch)
    loss.backward()
    grads = {name.replace(".default.", "."): to_numpy(p.grad)
             for name, p in model.named_parameters(trainable_only=True)}
    return loss.item(), metrics, grads, batch, trainer.reference


def run_both(tmp_path, loss_type, wrapped_by="trl", reference="disabled_adapter"):
    trainer = trl_trainer(tmp_path, loss_type, wrapped_by)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    assert batch["completion_mask"][:, 0].sum() == 0  # every prompt has at least its BOS
    theirs = trl_loss(trainer, batch)
    trainer.model.save_pretrained(tmp_path / "adapter")
    pad_id = trainer.processing_class.pad_token_id
    ours = minift_loss(tmp_path / "adapter", TokenPairs(batch), pad_id, loss_type, tmp_path, reference)
    # minift's collation of TRL's rows is TRL's batch shifted by one token: each row's last token
    # is only a label, its place in input_ids becomes padding
    ids, completion = batch["input_ids"].numpy(), batch["completion_mask"].numpy().astype(bool)
    real_next = batch["attention_mask"].numpy()[:, 1:].astype(bool)
    np.testing.assert_array_equal(ours[3]["input_ids"], np.where(real_next, ids[:, :-1], pad_id))
    np.testing.assert_array_equal(ours[3]["labels"], np.where(completion[:, 1:], ids[:, 1:], -100))
    return theirs, ours[:3], ours[4]


def assert_same_gradients(ours, theirs):
    assert ours.keys() == theirs.keys()
    assert len(ours) == 2 * len(TARGETS) * 2  # A and B of every target in both layers
    for name, expected in theirs.items():
        scale = np.abs(expected).max()
        assert scale > 1e-6, name  # not a trivially zero gradient
        np.testing.assert_allclose(ours[name], expected, rtol=0, atol=1e-4 * scale, err_msg=name)


def assert_same_metrics(metrics, trl_metrics):
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        np.testing.assert_allclose(metrics[key], trl_metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)
    pairs_won = round(trl_metrics["rewards/accuracies"] * len(PAIRS))  # TRL's mean is a float32
    assert metrics["rewards/accuracies"] == pairs_won / len(PAIRS)
    return pairs_won


def test_the_sigmoid_loss_rewards_and_lora_gradients_match_trl(tmp_path):
    (trl_value, trl_metrics, trl_grads), (value, metrics, grads), _ = run_both(tmp_path, "sigmoid")
    assert abs(trl_value - np.log(2)) > 1e-2  # the adapter moved the policy away from the reference
    np.testing.assert_allclose(value, trl_value, rtol=1e-5)
    assert 0 < assert_same_metrics(metrics, trl_metrics) < len(PAIRS)  # some pairs won, some lost
    assert_same_gradients(grads, trl_grads)


def test_the_ipo_loss_rewards_and_lora_gradients_match_trl(tmp_path):
    """IPO: both divide each answer's log-ratio by its length before the square; the logged
    rewards and log-probabilities stay the summed ones in both."""
    (trl_value, trl_metrics, trl_grads), (value, metrics, grads), _ = run_both(tmp_path, "ipo")
    np.testing.assert_allclose(value, trl_value, rtol=1e-5)
    assert_same_metrics(metrics, trl_metrics)
    assert_same_gradients(grads, trl_grads)


def test_a_trained_adapter_is_its_own_reference_in_both(tmp_path):
    """An adapter that already moved the model (B != 0): TRL's frozen "ref" copy of it and
    minift's ``reference="auto"`` (which picks "precomputed") both start at policy = reference,
    so the loss is ln 2 and every reward 0, with the same non-zero gradients."""
    (trl_value, trl_metrics, trl_grads), (value, metrics, grads), chosen = run_both(
        tmp_path, "sigmoid", wrapped_by="user", reference="auto")
    assert chosen == "precomputed"
    np.testing.assert_allclose(trl_value, np.log(2), rtol=1e-6)
    np.testing.assert_allclose(value, trl_value, rtol=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(trl_metrics[key]) < 1e-6 and abs(metrics[key]) < 1e-6, key
    np.testing.assert_allclose(metrics["logps/chosen"], trl_metrics["logps/chosen"], rtol=1e-5)
    assert_same_gradients(grads, trl_grads)
