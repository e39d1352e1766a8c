# About 350M active parameters, GPT-2-medium depth and width, SwiGLU d_ff, a 50k BPE.
# For one 80 GB GPU: bf16 autocast, torch.compile, the tables resident. Prepare the text
# data first, e.g.
#   python data/text/prepare.py --input=/path/to/text --vocab_size=50304
# and check the plan: python train.py config/stem_350m.py --device=cuda --dry_run=True
# (python cards.py prints it for every recipe and card).
dataset = "text"
out_dir = "out-stem-350m"
vocab_size = 50304
block_size = 1024
n_layer = 24
n_head = 16
n_embd = 1024
d_ff = 2816
tie_embeddings = True
ffn = "stem"
stem_layers = "full"        # or half / third / "1,3,5"; stem_variant = up | gate | up+table
# dense AdamW but for eps (docs/results.md compares them over seeds), as lazy tables: no
# table-sized gradient, which with gradient accumulation dense AdamW makes twice a micro-batch
table_optimizer = "adamw_catchup"
batch_size = 8
grad_accum_steps = 8        # 8 x 8 x 1024 = 65k tokens per step
learning_rate = 3e-4
max_iters = 20000
warmup_iters = 1000
weight_decay = 0.1
eval_interval = 1000
eval_iters = 50
compile = True
