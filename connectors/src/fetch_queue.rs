//! A consumer's fetched records read a batch at a time.
//!
//! `BaseConsumer::poll` hands out one record per call: a trip through the
//! consumer's queue (a lock, librdkafka's poll bookkeeping with two clock
//! reads, rust-rdkafka's deadline with a third) and a shared handle
//! allocated and freed for it. At a million records a second that was a
//! tenth of a worker's time (`bench/README.md`). Here the assigned
//! partitions' fetch queues are forwarded to a queue of the reader's own,
//! and `rd_kafka_consume_batch_queue` takes up to a batch from it in one
//! call. Everything else librdkafka reports (statistics, errors, logs) stays
//! on the consumer's own queue, which the owner still polls
//! ([`FetchQueue::consumer`]).
//!
//! The forwarding is set up before the partitions are assigned: librdkafka
//! keeps an application's forwarding when it starts fetching
//! (`RD_KAFKA_Q_F_FWD_APP`), so no record of an assigned partition ever
//! reaches the consumer's queue. Should one anyway, `poll` returns it and
//! the owner handles it as it would any record ([`Fetched::Polled`]).
//!
//! The second place in the workspace with `unsafe`: the batch call is not
//! in rust-rdkafka's API. Every pointer handled here comes from librdkafka
//! and is given back to it exactly once.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};

/// The most records one [`FetchQueue::read`] takes.
pub const MOST: usize = 64;

/// A consumer whose assigned partitions' records are read a batch at a time.
pub struct FetchQueue<C: ConsumerContext + 'static> {
    /// The reader's own queue, which the partitions' fetch queues feed.
    queue: NonNull<rd::rd_kafka_queue_t>,
    /// Declared after `queue`, but the queue is destroyed first, in `drop`
    /// (librdkafka hangs destroying a client whose queues are still held).
    consumer: BaseConsumer<C>,
}

impl<C: ConsumerContext + 'static> FetchQueue<C> {
    /// Forward `partitions` of `topic` to a queue of their own. Call before
    /// assigning them.
    pub fn new(
        consumer: BaseConsumer<C>,
        topic: &str,
        partitions: &[i32],
    ) -> Result<Self, KafkaError> {
        let rk = consumer.client().native_ptr();
        // SAFETY: `rk` is the consumer's live handle; the queue is ours to destroy.
        let queue = NonNull::new(unsafe { rd::rd_kafka_queue_new(rk) })
            .ok_or(KafkaError::ClientCreation("no queue for the fetched records".to_owned()))?;
        let reader = FetchQueue { queue, consumer };
        let topic = CString::new(topic)
            .map_err(|_| KafkaError::ClientCreation("a topic name with a NUL byte".to_owned()))?;
        for &p in partitions {
            // SAFETY: as above; a partition's queue handle is ours to destroy
            // (the partition keeps its queue, and the forwarding with it).
            unsafe {
                let pq = rd::rd_kafka_queue_get_partition(rk, topic.as_ptr(), p);
                let Some(pq) = NonNull::new(pq) else {
                    return Err(KafkaError::MessageConsumption(RDKafkaErrorCode::UnknownPartition));
                };
                rd::rd_kafka_queue_forward(pq.as_ptr(), reader.queue.as_ptr());
                rd::rd_kafka_queue_destroy(pq.as_ptr());
            }
        }
        Ok(reader)
    }

    /// The consumer: for assignment, pausing, offsets, and its own queue's
    /// events (statistics, errors), served by polling it.
    pub fn consumer(&self) -> &BaseConsumer<C> {
        &self.consumer
    }

    /// Append to `into` what has been fetched, at most `max` (and [`MOST`])
    /// records or partition events (an end of partition, an error, as
    /// `poll` returns them), waiting up to `wait` for the first.
    pub fn read<'c>(
        &'c self,
        max: usize,
        wait: Duration,
        into: &mut Vec<Result<Fetched<'c>, KafkaError>>,
    ) {
        let wait = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
        let max = max.min(MOST);
        let mut taken = [std::ptr::null_mut::<rd::rd_kafka_message_t>(); MOST];
        // SAFETY: `taken` has room for `max` pointers; librdkafka fills the
        // first `n` with messages we now own.
        let n = unsafe {
            rd::rd_kafka_consume_batch_queue(self.queue.as_ptr(), wait, taken.as_mut_ptr(), max)
        };
        let n = usize::try_from(n).unwrap_or(0).min(max);
        into.extend(taken[..n].iter().filter_map(|&m| NonNull::new(m)).map(|ptr| {
            let record = Record { ptr, _reader: PhantomData };
            match record.error() {
                Some(e) => Err(e),
                None => Ok(Fetched::Queued(record)),
            }
        }));
    }

    /// One poll of the consumer's own queue: serves its events, and returns
    /// a record only should one have reached it (see the module's documentation).
    pub fn poll(&self) -> Option<Result<Fetched<'_>, KafkaError>> {
        self.consumer.poll(Duration::ZERO).map(|r| r.map(Fetched::Polled))
    }
}

impl<C: ConsumerContext + 'static> Drop for FetchQueue<C> {
    fn drop(&mut self) {
        // SAFETY: the queue came from `rd_kafka_queue_new` and is destroyed
        // once, before the consumer (a field, dropped after this).
        unsafe { rd::rd_kafka_queue_destroy(self.queue.as_ptr()) };
    }
}

/// A record (or a partition event) taken from the reader's queue; given
/// back to librdkafka when dropped.
pub struct Record<'c> {
    ptr: NonNull<rd::rd_kafka_message_t>,
    _reader: PhantomData<&'c ()>,
}

impl Record<'_> {
    fn message(&self) -> &rd::rd_kafka_message_t {
        // SAFETY: librdkafka's message, valid until we destroy it in `drop`.
        unsafe { self.ptr.as_ref() }
    }

    /// The message's key or payload: `len` bytes at `ptr`, or none if null.
    fn bytes(&self, ptr: *mut std::ffi::c_void, len: usize) -> Option<&[u8]> {
        // SAFETY: librdkafka's bytes, valid as long as the message.
        (!ptr.is_null()).then(|| unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) })
    }

    /// The error it reports instead of a record: an end of partition, or
    /// a consumer error.
    fn error(&self) -> Option<KafkaError> {
        let m = self.message();
        match m.err {
            rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR => None,
            rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__PARTITION_EOF => {
                Some(KafkaError::PartitionEOF(m.partition))
            }
            e => Some(KafkaError::MessageConsumption(e.into())),
        }
    }
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        // SAFETY: ours since `read` took it, destroyed once.
        unsafe { rd::rd_kafka_message_destroy(self.ptr.as_ptr()) };
    }
}

/// A record read by [`FetchQueue::read`], or one the consumer's own poll returned.
pub enum Fetched<'c> {
    /// From the reader's queue.
    Queued(Record<'c>),
    /// From the consumer's queue.
    Polled(BorrowedMessage<'c>),
}

impl Fetched<'_> {
    /// Its partition.
    pub fn partition(&self) -> i32 {
        match self {
            Fetched::Queued(r) => r.message().partition,
            Fetched::Polled(m) => m.partition(),
        }
    }

    /// Its offset.
    pub fn offset(&self) -> i64 {
        match self {
            Fetched::Queued(r) => r.message().offset,
            Fetched::Polled(m) => m.offset(),
        }
    }

    /// Its value.
    pub fn payload(&self) -> Option<&[u8]> {
        match self {
            Fetched::Queued(r) => r.bytes(r.message().payload, r.message().len),
            Fetched::Polled(m) => m.payload(),
        }
    }

    /// Its key.
    pub fn key(&self) -> Option<&[u8]> {
        match self {
            Fetched::Queued(r) => r.bytes(r.message().key, r.message().key_len),
            Fetched::Polled(m) => m.key(),
        }
    }

    /// Its Kafka timestamp, ms, if it has one.
    pub fn timestamp_ms(&self) -> Option<i64> {
        match self {
            Fetched::Queued(r) => {
                let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
                // SAFETY: a live message, and a place for the type.
                let ts = unsafe { rd::rd_kafka_message_timestamp(r.ptr.as_ptr(), &mut kind) };
                (kind != rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE)
                    .then_some(ts)
            }
            Fetched::Polled(m) => m.timestamp().to_millis(),
        }
    }
}
