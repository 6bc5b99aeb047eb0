//! Running out of memory as a one-line error and exit status 1, instead of Rust's abort
//! with a backtrace (status 134).
//!
//! [`ReportingAllocator`] is the system allocator that, when the system gives no memory,
//! prints how much was asked for and what the program was doing ([`set_context`]: the
//! flags that size the work, e.g. `--batch-size` and `--size`), then exits with status 1.
//! Binaries install it with `#[global_allocator]`; libraries never do.
//!
//! It makes every failed allocation an exit, `try_reserve`'s included, so a program that
//! recovers from a failed allocation must not install it. And it reports only what the
//! allocator sees: Linux overcommits memory, so a request larger than memory and swap
//! fails at once (and is reported), but a run whose many smaller buffers add up to more
//! than the machine has is ended later by the kernel's OOM killer (SIGKILL), which no
//! program can report.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::sync::Mutex;

/// What the program is doing, for the message; set by [`set_context`].
static CONTEXT: Mutex<String> = Mutex::new(String::new());

/// Says what the program is doing, in words that end the out-of-memory message: e.g.
/// `"training resnext50_32x4d at --batch-size 256, 224×224 images: lower --batch-size"`.
/// Replaces the previous context.
pub fn set_context(what: impl Into<String>) {
    let what = what.into();
    let mut c = CONTEXT.lock().unwrap_or_else(|e| e.into_inner());
    *c = what;
}

/// The system allocator, reporting a failed allocation as an error line and exit status 1
/// (see the module's documentation).
#[derive(Clone, Copy, Debug, Default)]
pub struct ReportingAllocator;

// SAFETY: every call is forwarded to `System` unchanged; a null result, which `System`
// returns only when it has no memory, ends the process instead of being returned.
unsafe impl GlobalAlloc for ReportingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is `System`'s.
        or_exit(unsafe { System.alloc(layout) }, layout.size())
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is `System`'s.
        or_exit(unsafe { System.alloc_zeroed(layout) }, layout.size())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract is `System`'s.
        or_exit(unsafe { System.realloc(ptr, layout, new_size) }, new_size)
    }
}

/// `p`, unless it is null (the system had no `size` bytes): then [`out_of_memory`].
#[inline(always)]
fn or_exit(p: *mut u8, size: usize) -> *mut u8 {
    if p.is_null() {
        out_of_memory(size);
    }
    p
}

/// Prints the message and exits with status 1, without allocating (the allocator just
/// failed) and without running exit handlers that might (`_exit` where there is one).
#[cold]
#[inline(never)]
fn out_of_memory(size: usize) -> ! {
    let mut line = Line::new();
    // (`try_lock`: the thread that failed may be the one setting the context)
    match CONTEXT.try_lock() {
        Ok(c) => message(&mut line, size, &c),
        Err(_) => message(&mut line, size, ""),
    }
    let _ = std::io::stderr().write_all(line.as_bytes());
    #[cfg(unix)]
    // SAFETY: `_exit` ends the process at once; nothing after it runs.
    unsafe {
        libc::_exit(1)
    }
    #[cfg(not(unix))]
    std::process::exit(1)
}

/// The error line (with its newline) for a failed allocation of `size` bytes.
fn message(out: &mut Line, size: usize, context: &str) {
    let _ = write!(
        out,
        "error: out of memory: could not allocate {}",
        Bytes(size)
    );
    if !context.is_empty() {
        let _ = write!(out, " while {context}");
    }
    out.end_line();
}

/// A byte count in the largest binary unit that keeps it at least 1.
struct Bytes(usize);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
        let mut v = self.0 as f64;
        let mut unit = 0;
        while v >= 1024.0 && unit + 1 < UNITS.len() {
            v /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} bytes", self.0)
        } else {
            write!(f, "{v:.1} {}", UNITS[unit])
        }
    }
}

/// A line of text on the stack: what does not fit is cut (at a character boundary), and
/// [`Line::end_line`] always has room for the newline.
struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Line {
    fn new() -> Self {
        Self {
            buf: [0; 512],
            len: 0,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Ends the text with a newline (the byte [`fmt::Write`] keeps free for it).
    fn end_line(&mut self) {
        self.buf[self.len] = b'\n';
        self.len += 1;
    }
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // cut at a character boundary, one byte kept for the newline
        let room = self.buf.len() - 1 - self.len;
        let mut take = s.len().min(room);
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(size: usize, context: &str) -> String {
        let mut line = Line::new();
        message(&mut line, size, context);
        String::from_utf8(line.as_bytes().to_vec()).expect("the line is UTF-8")
    }

    #[test]
    fn the_line_names_the_size_and_what_was_running() {
        assert_eq!(
            text(3 << 40, "timing resnext50_32x4d at --batch 65536"),
            "error: out of memory: could not allocate 3.0 TiB while timing resnext50_32x4d \
             at --batch 65536\n"
        );
        assert_eq!(
            text(1536 << 20, ""),
            "error: out of memory: could not allocate 1.5 GiB\n"
        );
        assert_eq!(
            text(1000, ""),
            "error: out of memory: could not allocate 1000 bytes\n"
        );
    }

    #[test]
    fn a_long_context_is_cut_to_one_line_at_a_character_boundary() {
        let long = "é".repeat(600);
        let t = text(1 << 30, &long);
        assert!(t.len() <= 512 && t.len() >= 510, "{} bytes", t.len());
        assert!(t.ends_with('\n'));
        assert_eq!(t.matches('\n').count(), 1);
        assert!(t.starts_with("error: out of memory: could not allocate 1.0 GiB while éé"));
    }

    #[test]
    fn the_context_is_replaced_not_appended() {
        set_context("first");
        set_context("second");
        let c = CONTEXT.lock().expect("not poisoned").clone();
        assert_eq!(c, "second");
        set_context("");
    }
}
