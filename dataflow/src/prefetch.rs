//! Software prefetch: a hint that asks the CPU to start bringing memory into
//! its caches before the program reads it.
//!
//! A catch-up visits cards in an order the window operator knows ahead (the
//! departure queues list the cards that leave each window at the next
//! times), but the hardware cannot guess: with a million cards the states are
//! a gigabyte, and each visit waited for main memory, about 40 % of a
//! worker's time (`bench/README.md`). Asked a few cards ahead, those waits
//! overlap.
//!
//! The dataflow crate's one place for `unsafe`: `_mm_prefetch` is an
//! intrinsic of the `sse` target feature, so Rust makes every call unsafe,
//! although a prefetch never faults and changes nothing the program can
//! read. The address comes from a reference (or is one past a slice's end),
//! so it is a valid pointer anyway.
#![allow(unsafe_code)]

/// Bytes in a cache line.
pub(crate) const LINE: usize = 64;

/// Prefetch the cache lines of `value`, at most `max_lines` of them.
#[inline(always)]
pub fn prefetch<T: ?Sized>(value: &T, max_lines: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let start = (value as *const T).cast::<i8>();
        let size = std::mem::size_of_val(value).min(max_lines * LINE);
        let mut offset = 0;
        while offset < size {
            // `start + offset` lies inside `value`.
            hint(start.wrapping_add(offset));
            offset += LINE;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (value, max_lines);
}

/// Prefetch the last `max_lines` cache lines of `items` (all of it when shorter).
#[inline(always)]
pub fn prefetch_tail<T>(items: &[T], max_lines: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let size = std::mem::size_of_val(items);
        let skip = size.saturating_sub(max_lines * LINE);
        // Only the lines that hold `items[skip..]` are hinted.
        prefetch(&items[skip / std::mem::size_of::<T>().max(1)..], max_lines + 1);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (items, max_lines);
}

/// Prefetch the cache line just past `items`' end: where a queue with room
/// writes its next element (a hint only; nothing there is read through it).
#[inline(always)]
pub fn prefetch_after<T>(items: &[T]) {
    #[cfg(target_arch = "x86_64")]
    hint(items.as_ptr_range().end.cast::<i8>());
    #[cfg(not(target_arch = "x86_64"))]
    let _ = items;
}

/// Prefetch the cache line of `value`'s first byte and of its last (one
/// line, or two where `value` straddles a line's end).
#[inline(always)]
pub fn prefetch_span<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        let start = (value as *const T).cast::<i8>();
        let last = start.wrapping_add(std::mem::size_of::<T>().saturating_sub(1));
        hint(start);
        hint(last);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// Ask for the cache line of `address`, an address inside a value the
/// caller holds a reference to.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn hint(address: *const i8) {
    // SAFETY: a prefetch is a hint: it never faults and changes no value
    // the program reads.
    unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(address) };
}
