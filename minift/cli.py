"""The ``minift`` command: demo, train, finetune, generate, eval.

    minift demo                                   the whole story on bundled data (minutes)
    minift train --data corpus.txt --out runs/tiny            pretrain a tiny model from scratch
    minift finetune --model runs/tiny --data qa.jsonl --method freeze --out runs/ft
    minift generate --model runs/ft "How do I file a claim?" [--chat]
    minift eval --model runs/ft --data held_out.txt           loss and perplexity
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from minift.data import ByteTokenizer, DataLoader, InstructionDataset, TextDataset
from minift.io import load_model, save_model
from minift.methods import METHODS, MethodOptions, prepare_model
from minift.nn import trainable_report
from minift.peft import PeftModel
from minift.train import TrainConfig, Trainer, TrainingError, evaluate_loss, perplexity


def _tokenizer(name: str):
    if name != "byte":
        raise ValueError(f"unknown tokenizer {name!r} in the model folder")
    return ByteTokenizer()


def _train_config(args, out: Path) -> TrainConfig:
    return TrainConfig(max_steps=args.steps, lr=args.lr, schedule=args.schedule, warmup_ratio=args.warmup_ratio,
                       weight_decay=args.weight_decay, grad_accum_steps=args.grad_accum,
                       max_grad_norm=args.max_grad_norm, eval_every=args.eval_every,
                       save_every=args.save_every, out_dir=str(out), seed=args.seed)


def _run(trainer: Trainer, resume: bool) -> None:
    if resume and trainer.resume():
        print(f"resumed from step {trainer.step}")
    trainer.train()


def cmd_demo(args) -> None:
    from minift.demo import DemoSettings, run_demo  # noqa: PLC0415 - heavy imports only when used

    run_demo(args.out, DemoSettings.fast() if args.fast else DemoSettings())


def cmd_train(args) -> None:
    from minift.demo import tiny_config  # noqa: PLC0415

    tok = ByteTokenizer()
    text = Path(args.data).read_text()
    loader = DataLoader(TextDataset(text, tok, args.block_size), args.batch_size, seed=args.seed, pad_id=tok.pad_id)
    from minift.models import LlamaForCausalLM  # noqa: PLC0415

    model = LlamaForCausalLM(tiny_config(tok.vocab_size), seed=args.seed)
    print(trainable_report(model))
    _run(Trainer(model, _train_config(args, Path(args.out)), loader), args.resume)
    save_model(model, args.out)
    print(f"model saved to {args.out}")


def cmd_finetune(args) -> None:
    model, tok_name = load_model(args.model)
    tok = _tokenizer(tok_name)
    options = MethodOptions(layers=args.layers, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                            bottleneck=args.bottleneck, prefix_tokens=args.prefix_tokens, seed=args.seed)
    model, description = prepare_model(model, args.method, options)
    print(description)
    print(trainable_report(model))
    dataset = InstructionDataset(args.data, tok, model.config.max_seq_len, system_prompt=args.system)
    loader = DataLoader(dataset, args.batch_size, seed=args.seed, pad_id=tok.pad_id)
    eval_loader = None
    if args.eval_data:
        eval_set = InstructionDataset(args.eval_data, tok, model.config.max_seq_len, system_prompt=args.system)
        eval_loader = DataLoader(eval_set, args.batch_size, shuffle=False, pad_id=tok.pad_id)
    _run(Trainer(model, _train_config(args, Path(args.out)), loader, eval_loader), args.resume)
    if isinstance(model, PeftModel):
        model.save_pretrained(Path(args.out) / "adapter")
        print(f"LoRA adapter saved in PEFT format to {Path(args.out) / 'adapter'}")
        model = model.merge_and_unload()
    surgery = {"method": args.method, **asdict(options)} if args.method in ("adapter", "prefix") else None
    save_model(model, args.out, tokenizer=tok_name, surgery=surgery)
    print(f"model saved to {args.out}")


def cmd_generate(args) -> None:
    model, tok_name = load_model(args.model)
    tok = _tokenizer(tok_name)
    text = args.prompt
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        text = tok.apply_chat_template(messages + [{"role": "user", "content": text}], add_generation_prompt=True)
    ids = tok.encode(text)
    room = model.config.max_seq_len - len(ids)
    if room <= 0:
        raise ValueError(f"the prompt has {len(ids)} tokens; the context holds {model.config.max_seq_len}")
    out = model.generate([ids], min(args.max_new_tokens, room), temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, eos_id=tok.eos_id if args.chat else None, seed=args.seed)[0]
    print(tok.decode(out.tolist(), skip_special=True))


def cmd_eval(args) -> None:
    model, tok_name = load_model(args.model)
    tok = _tokenizer(tok_name)
    if args.data.endswith(".jsonl"):
        dataset = InstructionDataset(args.data, tok, model.config.max_seq_len, system_prompt=args.system)
    else:
        dataset = TextDataset(Path(args.data).read_text(), tok, args.block_size)
    loss = evaluate_loss(model, DataLoader(dataset, args.batch_size, shuffle=False, pad_id=tok.pad_id))
    print(f"loss {loss:.4f}  perplexity {perplexity(loss):.2f}")


def _add_training_flags(p) -> None:
    p.add_argument("--out", required=True, help="folder for checkpoints, metrics, plots and the model")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--schedule", default="cosine", choices=["constant", "linear", "cosine"])
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minift", description="LLM fine-tuning from scratch, in NumPy.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="pretrain a tiny model, fine-tune it three ways, compare")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--fast", action="store_true", help="a few steps only (smoke test)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="pretrain a tiny byte-level model on a text file")
    p.add_argument("--data", required=True)
    p.add_argument("--block-size", type=int, default=128)
    _add_training_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="fine-tune a saved model on instruction JSONL")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--eval-data")
    p.add_argument("--method", default="full", choices=METHODS)
    p.add_argument("--layers", type=int, help="blocks to freeze (freeze) or to train (last)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--bottleneck", type=int, default=16, help="adapter width (method adapter)")
    p.add_argument("--prefix-tokens", type=int, default=8, help="virtual tokens (method prefix)")
    p.add_argument("--system", help="system prompt added to every example")
    _add_training_flags(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("generate", help="continue a prompt (or answer it with --chat)")
    p.add_argument("prompt")
    p.add_argument("--model", required=True)
    p.add_argument("--chat", action="store_true")
    p.add_argument("--system")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="loss and perplexity on a .txt or .jsonl file")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--system")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (TrainingError, ValueError, FileNotFoundError, KeyError) as exc:
        print(f"minift {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
