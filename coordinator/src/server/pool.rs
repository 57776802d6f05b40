//! Bounded pools of the large buffers of the upload, decode and download
//! paths (issue #10, seventh pass).
//!
//! The coordinator's allocator returns freed pages to the system at once
//! (jemalloc with `dirty_decay_ms:0`, PERFORMANCE.md "fifth pass"), which
//! keeps its peak RSS ≤ 3 × the model — but a buffer freed after one upload
//! record and allocated again for the next costs page faults and zeroing
//! every time. A pool keeps a few such buffers instead: a buffer taken from
//! it goes back when dropped, empty, with its capacity (its pages) kept, as
//! long as the pool holds fewer than `max_count` buffers and `max_bytes` of
//! capacity in all; anything beyond is freed as before. What a pool keeps
//! is bounded by those two numbers, whatever the traffic.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// A bounded pool of `Vec<T>` buffers.
#[derive(Debug)]
pub(crate) struct BufPool<T> {
    kept: Mutex<Kept<T>>,
    max_count: usize,
    max_bytes: usize,
    /// Buffers come back with the length (and bytes) they had, for users
    /// that size a buffer with `resize` and then overwrite all of it: only
    /// what grows beyond the previous length is zeroed.
    keep_len: bool,
}

#[derive(Debug)]
struct Kept<T> {
    bufs: Vec<Vec<T>>,
    bytes: usize,
}

impl<T> BufPool<T> {
    /// A pool that keeps at most `max_count` buffers and `max_bytes` of
    /// their capacity in all.
    pub(crate) const fn new(max_count: usize, max_bytes: usize) -> Self {
        Self::with(max_count, max_bytes, false)
    }

    const fn with(max_count: usize, max_bytes: usize, keep_len: bool) -> Self {
        Self {
            kept: Mutex::new(Kept {
                bufs: Vec::new(),
                bytes: 0,
            }),
            max_count,
            max_bytes,
            keep_len,
        }
    }

    /// [`BufPool::new`] for a pool whose users size each buffer with
    /// `resize` and overwrite every byte before reading any (a record read
    /// from a stream or a file): its buffers come back with the length and
    /// bytes they had, so sizing one for the next record of about the same
    /// size zeroes nothing (a 2 MiB record was zeroed, then read over).
    pub(crate) const fn reusing(max_count: usize, max_bytes: usize) -> Self {
        Self::with(max_count, max_bytes, true)
    }

    /// A buffer with the capacity of one given back earlier if the pool
    /// holds any (empty, or with its old length and bytes for a
    /// [`BufPool::reusing`] pool); it returns to this pool when dropped.
    pub(crate) fn take(&self) -> Pooled<'_, T> {
        let buf = match self.kept.lock() {
            Ok(mut k) => match k.bufs.pop() {
                Some(b) => {
                    k.bytes = k.bytes.saturating_sub(cap_bytes(&b));
                    b
                }
                None => Vec::new(),
            },
            // A panic elsewhere while holding the lock: hand out fresh
            // buffers (the pool only saves work, it is never needed).
            Err(_) => Vec::new(),
        };
        Pooled { buf, pool: self }
    }

    /// Keep `buf` (emptied) if the bounds allow, else free it.
    fn give_back(&self, mut buf: Vec<T>) {
        let bytes = cap_bytes(&buf);
        if bytes == 0 || bytes > self.max_bytes {
            return;
        }
        if !self.keep_len {
            buf.clear();
        }
        if let Ok(mut k) = self.kept.lock()
            && k.bufs.len() < self.max_count
            && k.bytes.saturating_add(bytes) <= self.max_bytes
        {
            k.bytes += bytes;
            k.bufs.push(buf);
        }
    }

    /// How many buffers, and how many bytes of capacity, the pool holds.
    #[cfg(test)]
    fn holds(&self) -> (usize, usize) {
        self.kept
            .lock()
            .map(|k| (k.bufs.len(), k.bytes))
            .unwrap_or((0, 0))
    }
}

fn cap_bytes<T>(b: &Vec<T>) -> usize {
    b.capacity().saturating_mul(size_of::<T>())
}

/// A buffer on loan from a [`BufPool`]; derefs to its `Vec` and goes back
/// to the pool when dropped.
#[derive(Debug)]
pub(crate) struct Pooled<'a, T> {
    buf: Vec<T>,
    pool: &'a BufPool<T>,
}

impl<T> Deref for Pooled<'_, T> {
    type Target = Vec<T>;
    fn deref(&self) -> &Vec<T> {
        &self.buf
    }
}

impl<T> DerefMut for Pooled<'_, T> {
    fn deref_mut(&mut self) -> &mut Vec<T> {
        &mut self.buf
    }
}

impl<T> AsRef<[T]> for Pooled<'_, T> {
    fn as_ref(&self) -> &[T] {
        &self.buf
    }
}

impl<T> Drop for Pooled<'_, T> {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

// The bounds: what the pools keep between uploads is memory the
// coordinator may hold at its peak too, so together they stay ≤ 12 MiB: at
// 10M × 32 sites the peak was 2.85–2.92 × the model before the pools and
// 2.90–2.92 × with these bounds (2.96 × with twice as much kept), against
// the ≤ 3 × promise: PERFORMANCE.md, "seventh pass".

/// Upload chunk records: the receive buffer of each upload in flight
/// (`max_concurrent_uploads`, 4 by default) and the record buffer of each
/// validation or fold pass reading a spool. Records are ≤ 2 MiB raw
/// (`DEFAULT_CHUNK_BYTES`) and ≈ 0.5–1.1 MB as sent.
/// Their users overwrite every byte they size ([`BufPool::reusing`]).
pub(crate) static RECORDS: BufPool<u8> = BufPool::reusing(6, 6 << 20);

/// Decoded values of one chunk, per validation or fold pass
/// (≤ 512 Ki values = 2 MiB at the default chunk size).
pub(crate) static VALUES: BufPool<f32> = BufPool::new(2, 4 << 20);

/// Download pieces (256 KiB each) handed to QUIC: freed once the peer has
/// acknowledged them, so as many are in flight as the send windows of
/// the downloads hold.
/// Each is sized and then read over from the model's file whole
/// ([`BufPool::reusing`]).
pub(crate) static PIECES: BufPool<u8> = BufPool::reusing(8, 2 << 20);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_at_most_max_count_buffers() {
        let pool: BufPool<u8> = BufPool::new(2, 1 << 20);
        let mut loans: Vec<_> = (0..4).map(|_| pool.take()).collect();
        for l in &mut loans {
            l.resize(1000, 7);
        }
        drop(loans);
        let (count, bytes) = pool.holds();
        assert_eq!(count, 2);
        assert!((2000..=1 << 20).contains(&bytes), "{bytes}");
    }

    #[test]
    fn keeps_at_most_max_bytes() {
        let pool: BufPool<f32> = BufPool::new(10, 4096);
        let mut a = pool.take();
        a.reserve_exact(600); // 2400 bytes
        let mut b = pool.take();
        b.reserve_exact(600);
        let mut c = pool.take();
        c.reserve_exact(2000); // 8000 bytes: over the whole budget
        drop((a, b, c));
        let (count, bytes) = pool.holds();
        assert_eq!(count, 1, "only one 2400-byte buffer fits in 4096");
        assert!((2400..=4096).contains(&bytes), "{bytes}");
        // A loan comes from the pool and goes back to it.
        let d = pool.take();
        assert_eq!(pool.holds(), (0, 0));
        drop(d);
        assert_eq!(pool.holds().0, 1);
        // Buffers with nothing allocated are not kept.
        let other: BufPool<f32> = BufPool::new(10, 4096);
        drop(other.take());
        assert_eq!(other.holds(), (0, 0));
    }

    #[test]
    fn hands_back_empty_buffers_with_their_capacity() {
        let pool: BufPool<u8> = BufPool::new(4, 1 << 20);
        let mut a = pool.take();
        a.extend_from_slice(&[1, 2, 3]);
        a.resize(100_000, 9);
        let cap = a.capacity();
        drop(a);
        assert_eq!(pool.holds(), (1, cap));
        let b = pool.take();
        assert!(b.is_empty(), "a buffer comes back cleared");
        assert_eq!(b.capacity(), cap, "with the pages it had");
        assert_eq!(pool.holds(), (0, 0));
        drop(b);
        assert_eq!(pool.holds(), (1, cap));
    }

    #[test]
    fn a_reusing_pool_hands_back_buffers_as_they_were() {
        let pool: BufPool<u8> = BufPool::reusing(4, 1 << 20);
        let mut a = pool.take();
        a.resize(100_000, 9);
        drop(a);
        let mut b = pool.take();
        assert_eq!(b.len(), 100_000, "the length it had");
        // Sized for a shorter record: truncated, nothing zeroed.
        b.resize(60_000, 0);
        assert!(b.iter().all(|&x| x == 9));
        // Sized for a longer one: only the growth is zeroed.
        b.resize(120_000, 0);
        assert_eq!(
            b.get(100_000..).map(|t| t.iter().all(|&x| x == 0)),
            Some(true)
        );
    }
}
