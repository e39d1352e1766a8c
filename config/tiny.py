# The CPU default: a small STEM model on the embedded facts corpus (data/facts/prepare.py).
# Trains on 2 CPU cores in about 4 minutes. These are also train.py's built-in defaults;
# the file exists so that a fork has one place to start from.
dataset = "facts"
out_dir = "out-facts"
block_size = 64
n_layer = 4
n_head = 4
n_embd = 128
ffn = "stem"
stem_layers = "full"
batch_size = 32
max_iters = 2000
learning_rate = 3e-3
warmup_iters = 100
eval_interval = 250
