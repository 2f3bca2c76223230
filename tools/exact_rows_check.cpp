// Exact rows, checked on any CPU llama.cpp builds for: do the rows of one batch give, bit for bit,
// the logits the same tokens give decoded one at a time? The C++ twin of
// tools/exactness_table.py's batch_vs_sequential, so it runs where Python does not (a cross-built
// aarch64 libllama under qemu-user; see tools/arm_exactness.py).
//
//   exact_rows_check MODEL.gguf [SIZES=2,3,4,8,16] [CONTEXT=48] [THREADS=2] [exact|stock]
//
// Prints one line per flash-attention setting and batch size: the max abs logit difference and the
// number of rows that are not bit-identical; exits 1 if any row differs, 2 on a setup error.
// `stock` runs the same check with exact rows off (what llama.cpp's batched kernels give).
#include "llama.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

static bool decode(llama_context * ctx, const std::vector<llama_token> & toks, int pos0) {
    llama_batch b = llama_batch_init((int) toks.size(), 0, 1);
    for (size_t i = 0; i < toks.size(); i++) {
        b.token[i] = toks[i];
        b.pos[i] = pos0 + (int) i;
        b.n_seq_id[i] = 1;
        b.seq_id[i][0] = 0;
        b.logits[i] = true;
    }
    b.n_tokens = (int) toks.size();
    const int rc = llama_decode(ctx, b);
    llama_batch_free(b);
    return rc == 0;
}

int main(int argc, char ** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL.gguf [SIZES=2,3,4,8,16] [CONTEXT=48] [THREADS=2] [exact|stock]\n", argv[0]);
        return 2;
    }
    std::vector<int> sizes;
    std::stringstream ss(argc > 2 ? argv[2] : "2,3,4,8,16");
    for (std::string item; std::getline(ss, item, ',');) {
        sizes.push_back(std::atoi(item.c_str()));
    }
    const int n_context = argc > 3 ? std::atoi(argv[3]) : 48;
    const int n_threads = argc > 4 ? std::atoi(argv[4]) : 2;
    const bool exact = argc <= 5 || strcmp(argv[5], "stock") != 0;  // stock: llama.cpp's own kernels, to compare
    int n_max = 0;
    for (int n : sizes) {
        n_max = n > n_max ? n : n_max;
    }

    llama_log_set([](ggml_log_level, const char *, void *) {}, nullptr);
    llama_backend_init();
    llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (model == nullptr) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 2;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    std::mt19937 rng(1);
    std::uniform_int_distribution<int> pick(100, n_vocab - 1);
    std::vector<llama_token> context(n_context), tokens(n_max);
    for (auto & t : context) t = pick(rng);
    for (auto & t : tokens) t = pick(rng);

    bool all_equal = true;
    for (int fa = 1; fa >= 0; fa--) {
        llama_context_params cp = llama_context_default_params();
        cp.n_ctx = 512;
        cp.n_batch = 512;
        cp.n_ubatch = 512;
        cp.n_threads = cp.n_threads_batch = n_threads;
        cp.flash_attn_type = fa ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
        llama_context * ctx = llama_init_from_model(model, cp);
        if (ctx == nullptr || edge_mtp_set_exact_rows(ctx, exact) != 0 || !decode(ctx, context, 0)) {
            fprintf(stderr, "cannot set up a context (flash attention %s)\n", fa ? "on" : "off");
            return 2;
        }
        std::vector<float> alone((size_t) n_max * n_vocab);
        for (int i = 0; i < n_max; i++) {
            if (!decode(ctx, {tokens[i]}, n_context + i)) {
                fprintf(stderr, "one-row decode failed\n");
                return 2;
            }
            memcpy(&alone[(size_t) i * n_vocab], llama_get_logits_ith(ctx, -1), sizeof(float) * n_vocab);
        }
        for (int n : sizes) {
            llama_memory_seq_rm(llama_get_memory(ctx), 0, n_context, -1);
            if (!decode(ctx, std::vector<llama_token>(tokens.begin(), tokens.begin() + n), n_context)) {
                fprintf(stderr, "decode of %d rows failed\n", n);
                return 2;
            }
            float max_diff = 0.0f;
            long rows_differ = 0;
            for (int i = 0; i < n; i++) {
                const float * row = llama_get_logits_ith(ctx, i);
                const float * ref = &alone[(size_t) i * n_vocab];
                for (int v = 0; v < n_vocab; v++) {
                    max_diff = std::fmax(max_diff, std::fabs(row[v] - ref[v]));
                }
                rows_differ += memcmp(row, ref, sizeof(float) * n_vocab) != 0;
            }
            all_equal = all_equal && rows_differ == 0;
            printf("flash_attn=%s n=%d max_abs_diff=%g rows_differing=%ld\n", fa ? "on" : "off", n, max_diff, rows_differ);
        }
        llama_memory_seq_rm(llama_get_memory(ctx), 0, n_context, -1);
        llama_free(ctx);
    }
    llama_model_free(model);
    return all_equal ? 0 : 1;
}
