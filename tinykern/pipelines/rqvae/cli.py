"""`tinykern rqvae train|generate|demo`: the command line of the RQ-VAE pipeline
(tinykern/__main__.py adds it with `add_parser` and hands `rqvae` commands to `run`)."""

from tinykern.pipelines import cli_checks as checks


def add_parser(subparsers):
    rq = subparsers.add_parser("rqvae", help="RQ-VAE text-to-image pipeline: train, generate, demo")
    sub = rq.add_subparsers(dest="rqvae_command", required=True)

    train = sub.add_parser("train", help="train one stage: tokenizer, refiner or generator")
    train.add_argument("stage", choices=["tokenizer", "refiner", "generator"])
    train.add_argument("--data", default="synthetic",
                       help="'synthetic' (procedural captioned shapes) or an image folder with captions.jsonl/.csv or "
                            "a .txt caption beside each image")
    train.add_argument("--out", default="rqvae-run", help="directory for checkpoints and metrics")
    train.add_argument("--steps", type=int, default=1000)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=None, help="peak learning rate (default per stage)")
    train.add_argument("--preset", default="shipped", choices=["shipped", "standard"],
                       help="model sizes: 'shipped' (64x64 -> 8x8x4) or 'standard' (256x256 -> 16x16x4)")
    train.add_argument("--resolution", type=int, default=None, help="tokenizer image side (default: the preset's)")
    train.add_argument("--tokenizer", default=None,
                       help="RQ-VAE weights for the refiner/generator stages (default: OUT/tokenizer.safetensors; "
                            "with --preset shipped and none there, the shipped one)")
    train.add_argument("--checkpoint-every", type=int, default=200)
    train.add_argument("--eval-every", type=int, default=200,
                       help="evaluate every N steps (the last step is evaluated only if N divides --steps)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/<stage>-last.safetensors")
    train.add_argument("--init", default=None, metavar="WEIGHTS",
                       help="start from this trained checkpoint of the stage (same config): fine-tuning with a "
                            "fresh optimizer and schedule")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    train.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward passes")
    train.add_argument("--text-tokenizer", default="word", choices=["word", "clip"],
                       help="generator prompts: 'word' (the captions' words; the shipped model) or 'clip' (CLIP BPE)")
    train.add_argument("--text-encoder", default=None, metavar="FOLDER",
                       help="condition the generator on this frozen transformers CLIPTextModel (e.g. SD1.5's "
                            "text_encoder/) instead of the small trainable text encoder")

    gen = sub.add_parser("generate", help="text -> image grid with the (shipped) model")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--n", type=int, default=8)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--weights", default=None,
                     help="directory with tokenizer/refiner/generator.safetensors (default: the shipped model)")
    gen.add_argument("--out", default="grid.png")
    gen.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (0: off)")
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--no-quant", action="store_true", help="keep the generator's Linear layers in fp32")
    gen.add_argument("--no-refine", action="store_true", help="skip the refinement UNet")
    gen.add_argument("--text-encoder", default=None, metavar="FOLDER",
                     help="the CLIP text model of a generator trained over one, if it has moved since training")
    gen.add_argument("--device", default="cpu")

    demo = sub.add_parser("demo", help="a grid for a handful of prompts and a speed/memory/agreement table")
    demo.add_argument("--out", default="rqvae-demo.png")
    demo.add_argument("--device", default="cpu")
    return rq


def run(args):
    """Run a parsed `rqvae` command. Arguments are checked before any model or data loads, and
    bad input (arguments, data, weights) ends it with one line on stderr and exit code 2."""
    with checks.one_line_errors(f"tinykern rqvae {args.rqvae_command}"):
        {"train": _train, "generate": _generate, "demo": _demo}[args.rqvae_command](args)


def _train(args):
    import torch

    from tinykern.pipelines.rqvae.train import train

    if args.data != "synthetic":
        args.data = checks.existing("--data", args.data, "dir")
    args.out = checks.output_folder("--out", args.out)
    args.tokenizer = args.tokenizer and checks.existing("--tokenizer", args.tokenizer, "file")
    args.init = args.init and checks.existing("--init", args.init, "file")
    args.text_encoder = args.text_encoder and checks.existing("--text-encoder", args.text_encoder, "dir")
    checks.at_least("--threads", args.threads, 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    # train() checks the numbers and the preset's needs before it reads or writes anything.
    train(args.stage, data=args.data, out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
          preset=args.preset, resolution=args.resolution, tokenizer=args.tokenizer,
          checkpoint_every=args.checkpoint_every, eval_every=args.eval_every, resume=args.resume, seed=args.seed,
          bf16=args.bf16, text_tokenizer=args.text_tokenizer, text_encoder=args.text_encoder, init=args.init)


def _generate(args):
    checks.device("--device", args.device)
    args.weights = args.weights and checks.existing("--weights", args.weights, "dir")
    args.text_encoder = args.text_encoder and checks.existing("--text-encoder", args.text_encoder, "dir")
    args.out = checks.image_file("--out", args.out)
    checks.at_least("--n", args.n, 1)
    checks.at_least("--guidance", args.guidance, 0)
    checks.positive("--temperature", args.temperature)
    from tinykern.pipelines.rqvae.generate import GUIDANCE, TEMPERATURE, Pipeline, save_grid

    pipe = Pipeline.load(args.weights, quantize=not args.no_quant, device=args.device, text_encoder=args.text_encoder)
    images, stats = pipe.generate([args.prompt] * args.n, seed=args.seed,
                                  guidance=GUIDANCE if args.guidance is None else args.guidance,
                                  temperature=TEMPERATURE if args.temperature is None else args.temperature,
                                  refine=not args.no_refine)
    save_grid(images, args.out)
    print(f"{args.n} images in {stats['seconds']:.2f} s: {stats['images_per_s']:.2f} images/s, "
          f"peak memory {stats['peak_memory_mb']:.0f} MB ({stats['memory_kind']}), "
          f"generator {'Q4_K' if not args.no_quant else 'fp32'}; wrote {args.out}")


def _demo(args):
    checks.device("--device", args.device)
    args.out = checks.image_file("--out", args.out)
    from tinykern.pipelines.rqvae.demo import run as demo

    demo(out=args.out, device=args.device)
