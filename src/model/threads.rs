//! Running tract's matrix products on more than one core while a reply is generated.
//!
//! A decode step is a chain of small matrix-vector products (one token against each weight
//! matrix), a few tens of microseconds each. tract can split each product over a rayon pool,
//! but a rayon worker that finds no work goes to sleep within microseconds, and waking it
//! again costs more than the product saves: measured on the 2-core machine, a plain 2-thread
//! pool made decoding slower than one thread. So while a generation runs, [`StepPool::run`]
//! keeps the other workers awake in a spinning job that picks up each product's chunks as soon
//! as they are posted, the way ONNX Runtime's own thread pool spins between operators. The
//! spinning stops when the generation ends.
//!
//! One generation at a time uses a pool; a generation that finds it busy (the bot replying in
//! two channels at once) runs on its own thread, which keeps the two from stalling each other.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once, TryLockError};

use tract_linalg::multithread::{self, Executor};

use super::ModelError;

/// The number of threads a generation uses when nothing says otherwise: the machine's cores, at
/// most 4. Every extra thread spins for the whole generation; only 2 have been measured (the
/// development machine has 2 cores), and a small model's products are too short to feed many.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4)
}

/// A thread pool for one model's generations.
#[derive(Debug)]
pub struct StepPool {
    pool: Arc<rayon::ThreadPool>,
    busy: Mutex<()>,
}

impl StepPool {
    /// A pool of `threads` workers, or `None` for one thread (no pool at all).
    pub fn new(threads: usize) -> Result<Option<Self>, ModelError> {
        if threads <= 1 {
            return Ok(None);
        }
        static THRESHOLDS: Once = Once::new();
        THRESHOLDS.call_once(|| {
            // tract's defaults keep every product below 64 panels or 2 M multiply-adds on the
            // calling thread, which is every product of a small model's decode step. With the
            // workers spinning, splitting even a 256×256 product pays (measured).
            multithread::set_threading_panel_threshold(0);
            multithread::set_threading_mac_threshold(0);
        });
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("kaiwa-tract-{i}"))
            .build()
            .map_err(|e| ModelError::Inference(format!("cannot start {threads} threads: {e}")))?;
        Ok(Some(StepPool {
            pool: Arc::new(pool),
            busy: Mutex::new(()),
        }))
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Runs `f` (a whole generation: prefill and every decode step) with tract's products
    /// split over the pool, or on the calling thread if another generation holds the pool.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let _guard = match self.busy.try_lock() {
            Ok(guard) => guard,
            // A generation that panicked leaves nothing behind that the next one could trip on.
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return f(),
        };
        let executor = Executor::MultiThread(Arc::clone(&self.pool));
        self.pool.install(|| {
            let done = AtomicBool::new(false);
            rayon::scope(|scope| {
                for _ in 1..self.threads() {
                    scope.spawn(|_| spin_until(&done));
                }
                // Stops the spinners however `f` ends, a panic included: the scope waits for them.
                let _stop = StopOnDrop(&done);
                multithread::multithread_tract_scope(executor, f)
            })
        })
    }
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Keeps a worker awake, running the pool's pending jobs as they come, until `done`.
fn spin_until(done: &AtomicBool) {
    let mut idle = 0u32;
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle = 0;
            continue;
        }
        idle = idle.wrapping_add(1);
        if idle.is_multiple_of(256) {
            // On a busy machine, let other processes have the core now and then.
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}
