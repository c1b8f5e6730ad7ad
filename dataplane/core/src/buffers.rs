//! How big a read buffer to use next, so that busy connections read in large chunks and quiet
//! ones hold no buffer at all.
//!
//! A read that fills its buffer means more is waiting: read again at once, with a bigger buffer.
//! A read that comes back short means the socket is drained: drop the buffer and wait for
//! readiness before allocating again, so an idle held connection costs no buffer memory.

pub const MIN_READ: usize = 16 * 1024;
pub const MAX_READ: usize = 256 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextRead {
    /// Data is likely waiting: read now into a buffer of this size.
    Now(usize),
    /// Drained: release the buffer, wait until readable, then read this many.
    WhenReadable(usize),
}

#[derive(Clone, Copy, Debug)]
pub struct ReadSizer {
    size: usize,
    next: NextRead,
}

impl Default for ReadSizer {
    fn default() -> Self {
        ReadSizer {
            size: MIN_READ,
            next: NextRead::WhenReadable(MIN_READ),
        }
    }
}

impl ReadSizer {
    pub fn next(&self) -> NextRead {
        self.next
    }

    /// Records that a read of `capacity` bytes returned `n`.
    pub fn observe(&mut self, n: usize, capacity: usize) {
        if n >= capacity {
            self.size = (self.size * 2).min(MAX_READ);
            self.next = NextRead::Now(self.size);
        } else {
            if n < self.size / 8 {
                self.size = (self.size / 2).max(MIN_READ);
            }
            self.next = NextRead::WhenReadable(self.size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_while_reads_fill_and_waits_once_drained() {
        let mut s = ReadSizer::default();
        assert_eq!(s.next(), NextRead::WhenReadable(MIN_READ));
        s.observe(MIN_READ, MIN_READ);
        assert_eq!(s.next(), NextRead::Now(2 * MIN_READ));
        for _ in 0..10 {
            let NextRead::Now(cap) = s.next() else {
                panic!("still streaming")
            };
            s.observe(cap, cap);
        }
        assert_eq!(s.next(), NextRead::Now(MAX_READ));
        s.observe(MAX_READ / 2, MAX_READ);
        assert_eq!(s.next(), NextRead::WhenReadable(MAX_READ));
    }

    #[test]
    fn shrinks_back_when_reads_are_small() {
        let mut s = ReadSizer::default();
        for _ in 0..5 {
            s.observe(MAX_READ, MAX_READ);
        }
        for _ in 0..10 {
            s.observe(100, MAX_READ);
        }
        assert_eq!(s.next(), NextRead::WhenReadable(MIN_READ));
    }
}
