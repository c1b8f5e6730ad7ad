//! Single-threaded signalling between a worker's tasks: a oneshot channel (the pool hands a
//! connection to a waiting task), switches tasks wait on, and a count of running tasks. All on
//! one worker, so nothing here needs atomics or locks.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

struct Slot<T> {
    value: Option<T>,
    waker: Option<Waker>,
    sender_gone: bool,
}

pub struct Sender<T>(Rc<RefCell<Slot<T>>>);
pub struct Receiver<T>(Rc<RefCell<Slot<T>>>);

pub fn oneshot<T>() -> (Sender<T>, Receiver<T>) {
    let slot = Rc::new(RefCell::new(Slot {
        value: None,
        waker: None,
        sender_gone: false,
    }));
    (Sender(slot.clone()), Receiver(slot))
}

impl<T> Sender<T> {
    /// Delivers `value`; gives it back if the receiver is gone.
    pub fn send(self, value: T) -> Result<(), T> {
        if Rc::strong_count(&self.0) == 1 {
            return Err(value);
        }
        let waker = {
            let mut slot = self.0.borrow_mut();
            slot.value = Some(value);
            slot.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut slot = self.0.borrow_mut();
            slot.sender_gone = true;
            slot.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Receiver<T> {
    /// Takes a value that was delivered but not awaited (used when the receiver gives up).
    pub fn try_take(&self) -> Option<T> {
        self.0.borrow_mut().value.take()
    }
}

/// Resolves to `None` if the sender was dropped without sending.
impl<T> Future for Receiver<T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut slot = self.0.borrow_mut();
        if let Some(v) = slot.value.take() {
            return Poll::Ready(Some(v));
        }
        if slot.sender_gone {
            return Poll::Ready(None);
        }
        slot.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// A one-way switch a task can wait on: fired by the worker (for instance when a new policy
/// denies a live connection), observed by the connection's relay.
#[derive(Default)]
pub struct Trigger {
    fired: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Trigger {
    pub fn fire(&self) {
        self.fired.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    pub fn fired(&self) -> bool {
        self.fired.get()
    }

    pub fn poll_fired(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.fired.get() {
            Poll::Ready(())
        } else {
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

/// A one-way switch many tasks wait on (the worker's drain): each waiter holds a
/// [`Subscription`], which takes its waker back out when dropped.
#[derive(Default)]
pub struct Broadcast {
    fired: Cell<bool>,
    wakers: RefCell<std::collections::HashMap<u64, Waker>>,
    next: Cell<u64>,
}

impl Broadcast {
    pub fn fire(&self) {
        self.fired.set(true);
        let wakers: Vec<Waker> = self.wakers.borrow_mut().drain().map(|(_, w)| w).collect();
        for w in wakers {
            w.wake();
        }
    }

    pub fn fired(&self) -> bool {
        self.fired.get()
    }

    pub fn subscribe(&self) -> Subscription<'_> {
        let id = self.next.get();
        self.next.set(id + 1);
        Subscription {
            broadcast: self,
            id,
        }
    }
}

pub struct Subscription<'a> {
    broadcast: &'a Broadcast,
    id: u64,
}

impl Subscription<'_> {
    pub fn poll_fired(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.broadcast.fired.get() {
            return Poll::Ready(());
        }
        self.broadcast
            .wakers
            .borrow_mut()
            .insert(self.id, cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        self.broadcast.wakers.borrow_mut().remove(&self.id);
    }
}

/// How many tasks of one kind run on a worker (its accept loops), for one task that waits until
/// none does.
#[derive(Default)]
pub struct TaskCount {
    running: Cell<usize>,
    waiter: RefCell<Option<Waker>>,
}

impl TaskCount {
    /// Counts a task until the guard it returns is dropped.
    pub fn enter(self: &Rc<Self>) -> TaskCountGuard {
        self.running.set(self.running.get() + 1);
        TaskCountGuard(self.clone())
    }

    pub fn running(&self) -> usize {
        self.running.get()
    }

    /// Resolves once no counted task runs.
    pub async fn none_running(&self) {
        std::future::poll_fn(|cx| {
            if self.running.get() == 0 {
                Poll::Ready(())
            } else {
                *self.waiter.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

pub struct TaskCountGuard(Rc<TaskCount>);

impl Drop for TaskCountGuard {
    fn drop(&mut self) {
        let left = self.0.running.get() - 1;
        self.0.running.set(left);
        if left == 0 {
            if let Some(w) = self.0.waiter.borrow_mut().take() {
                w.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    /// A waker that notes it was woken.
    struct Flag(AtomicBool);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_waiter_wakes_only_when_the_last_counted_task_ends() {
        let count = Rc::new(TaskCount::default());
        let first = count.enter();
        let second = count.enter();
        let flag = Arc::new(Flag(Default::default()));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        let mut wait = Box::pin(count.none_running());
        assert!(wait.as_mut().poll(&mut cx).is_pending(), "two still run");
        drop(first);
        assert!(!flag.0.load(Ordering::SeqCst), "woken while one still runs");
        assert_eq!(count.running(), 1);
        drop(second);
        assert!(flag.0.load(Ordering::SeqCst), "not woken");
        assert!(wait.as_mut().poll(&mut cx).is_ready());
        assert!(
            Box::pin(TaskCount::default().none_running())
                .as_mut()
                .poll(&mut cx)
                .is_ready(),
            "nothing counted: nothing to wait for"
        );
    }
}
