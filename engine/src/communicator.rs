//! Collective operations between the tensor-parallel workers of one engine.
//!
//! The trait is generic over the buffer it works on, so each backend reduces
//! its own memory: `[f32]` in host memory for the CPU backend (the default, so
//! `dyn Communicator` is the CPU's), device rows for the CUDA backend, whose
//! NCCL communicator (`crate::cuda::device::NcclComm`) implements
//! `Communicator<DeviceRows>`.
//!
//! The CPU communicator joins worker threads of one process through shared
//! buffers and a barrier.

use std::sync::{Barrier, Mutex};

/// One tensor-parallel worker's view of its group (vLLM's
/// `GroupCoordinator`): collectives over buffers of type `B`. Every worker of
/// the group must make the same calls in the same order, or they deadlock.
pub trait Communicator<B: ?Sized = [f32]>: Send + Sync {
    /// This worker's rank in the group, `0..world_size()`.
    fn rank(&self) -> usize;
    /// Workers in the group.
    fn world_size(&self) -> usize;
    /// Every rank's `buf` becomes the element-wise sum over ranks. Ranks sum in the
    /// same order, so all ranks hold bit-identical results.
    fn all_reduce_sum(&self, buf: &mut B);
    /// Concatenates each rank's `local` in rank order into `out` on every rank.
    /// `out`'s length must equal the sum of the ranks' local lengths.
    fn all_gather(&self, local: &B, out: &mut B);
}

/// The trivial communicator of a single worker, for host slices of any
/// element type (a device backend alone has nothing to reduce either, but its
/// buffers are its own type: it brings its own no-op).
pub struct SoloCommunicator;

impl<T: Copy> Communicator<[T]> for SoloCommunicator {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [T]) {}
    fn all_gather(&self, local: &[T], out: &mut [T]) {
        out.copy_from_slice(local);
    }
}

/// State shared by the threads of one CPU tensor-parallel group.
pub struct CpuGroup {
    slots: Vec<Mutex<Vec<f32>>>,
    barrier: Barrier,
}

impl CpuGroup {
    /// A group of `world_size` workers; each takes its communicator with
    /// [`Self::member`] and runs on its own thread.
    pub fn new(world_size: usize) -> std::sync::Arc<CpuGroup> {
        std::sync::Arc::new(CpuGroup {
            slots: (0..world_size).map(|_| Mutex::new(Vec::new())).collect(),
            barrier: Barrier::new(world_size),
        })
    }

    /// The communicator for worker `rank`.
    pub fn member(self: &std::sync::Arc<Self>, rank: usize) -> CpuCommunicator {
        assert!(rank < self.slots.len(), "rank {rank} outside a group of {}", self.slots.len());
        CpuCommunicator { group: self.clone(), rank }
    }
}

/// One CPU worker's communicator: publishes its buffer in its group's slot,
/// then reads everyone's between two barriers.
pub struct CpuCommunicator {
    group: std::sync::Arc<CpuGroup>,
    rank: usize,
}

impl CpuCommunicator {
    fn publish(&self, data: &[f32]) {
        let mut slot = self.group.slots[self.rank].lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        slot.clear();
        slot.extend_from_slice(data);
    }
}

impl Communicator for CpuCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.group.slots.len()
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) {
        self.publish(buf);
        self.group.barrier.wait();
        buf.fill(0.0);
        for slot in &self.group.slots {
            let s = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (b, x) in buf.iter_mut().zip(s.iter()) {
                *b += *x;
            }
        }
        // Nobody may overwrite a slot until everyone has read them all.
        self.group.barrier.wait();
    }

    fn all_gather(&self, local: &[f32], out: &mut [f32]) {
        self.publish(local);
        self.group.barrier.wait();
        let mut at = 0;
        for slot in &self.group.slots {
            let s = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let end = (at + s.len()).min(out.len());
            out[at..end].copy_from_slice(&s[..end - at]);
            at = end;
        }
        self.group.barrier.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_reduce_and_gather_over_threads() {
        for world in [1usize, 2, 4] {
            let group = CpuGroup::new(world);
            let handles: Vec<_> = (0..world)
                .map(|r| {
                    let comm = group.member(r);
                    std::thread::spawn(move || {
                        let mut buf: Vec<f32> = (0..5).map(|i| (i * 10 + r) as f32).collect();
                        comm.all_reduce_sum(&mut buf);
                        let local = vec![r as f32; r + 1];
                        let total: usize = (1..=world).sum();
                        let mut out = vec![-1.0; total];
                        comm.all_gather(&local, &mut out);
                        (buf, out)
                    })
                })
                .collect();
            let rank_sum: usize = (0..world).sum();
            for h in handles {
                let (buf, out) = h.join().unwrap();
                let want: Vec<f32> = (0..5).map(|i| (i * 10 * world + rank_sum) as f32).collect();
                assert_eq!(buf, want);
                let want_out: Vec<f32> = (0..world).flat_map(|r| vec![r as f32; r + 1]).collect();
                assert_eq!(out, want_out);
            }
        }
    }
}
