# About 350M active parameters, GPT-2-medium depth and width, SwiGLU d_ff, a 50k BPE.
# For one GPU: bf16 autocast, torch.compile. Prepare the text data first, e.g.
#   python data/text/prepare.py --input=/path/to/text --vocab_size=50304
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
batch_size = 16
grad_accum_steps = 4        # 16 x 4 x 1024 = 65k tokens per step
learning_rate = 3e-4
max_iters = 20000
warmup_iters = 1000
weight_decay = 0.1
eval_interval = 1000
eval_iters = 50
compile = True
