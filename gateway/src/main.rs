//! The `ferry` binary: the CLI (`ferry serve`, `ferry bench`, ...), all in the
//! library's `run_cli`.

// mimalloc, not glibc's malloc: after a burst of large requests (big prompts
// tokenized, long stop lists) glibc kept the peak resident while mimalloc gave
// most of it back; figures and the command in docs/performance.md
// ("Memory after a burst").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    ferry::run_cli();
}
