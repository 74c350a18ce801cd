//! Log output that costs a request no wake-up. A log line is formatted on the calling thread and
//! appended to a shared buffer; a writer thread writes the buffer out every `interval`. With a
//! line per request (the access log), handing each line to a writer thread would wake that
//! thread once per request. Nothing is dropped: when the buffer is past its limit (a log storm
//! or a stalled output), the caller writes it out itself and so waits, as a plain write would.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Past this many buffered bytes, the next caller writes the buffer out itself.
const LIMIT: usize = 1 << 20;

pub struct LogSink {
    buf: Mutex<Vec<u8>>,
    out: Mutex<Box<dyn Write + Send>>,
    /// Set when the writer thread could not start: callers then write their lines themselves.
    direct: AtomicBool,
}

static GLOBAL: OnceLock<Arc<LogSink>> = OnceLock::new();

impl LogSink {
    /// A sink over `out`, written out every `interval` by a thread of its own. The first sink
    /// started is the one [`flush_global`] flushes.
    pub fn start(out: Box<dyn Write + Send>, interval: Duration) -> Arc<LogSink> {
        let sink = Arc::new(LogSink {
            buf: Mutex::new(Vec::with_capacity(64 << 10)),
            out: Mutex::new(out),
            direct: AtomicBool::new(false),
        });
        let _ = GLOBAL.set(sink.clone());
        let writer = sink.clone();
        let spawned = std::thread::Builder::new()
            .name("log writer".into())
            .spawn(move || loop {
                std::thread::sleep(interval);
                writer.flush();
            });
        if spawned.is_err() {
            // No thread: every line is written by its caller instead.
            sink.direct.store(true, Ordering::Relaxed);
        }
        sink
    }

    /// Writes out what is buffered.
    pub fn flush(&self) {
        // The output lock is taken first and held while writing, so lines keep their order.
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let pending = {
            let mut buf = self.buf.lock().unwrap_or_else(|e| e.into_inner());
            if buf.is_empty() {
                return;
            }
            let cap = buf.capacity().min(LIMIT);
            std::mem::replace(&mut *buf, Vec::with_capacity(cap))
        };
        let _ = out.write_all(&pending);
        let _ = out.flush();
    }

    /// Appends whole lines; written out within the interval.
    pub fn append(&self, line: &[u8]) {
        let full = {
            let mut buf = self.buf.lock().unwrap_or_else(|e| e.into_inner());
            buf.extend_from_slice(line);
            buf.len() >= LIMIT || self.direct.load(Ordering::Relaxed)
        };
        if full {
            self.flush();
        }
    }
}

/// Writes out the buffer of the sink started first, if any (at shutdown).
pub fn flush_global() {
    if let Some(sink) = GLOBAL.get() {
        sink.flush();
    }
}

/// One log event's writer: `tracing_subscriber` formats the whole line, then writes it here.
pub struct SinkWriter<'a>(&'a LogSink);

impl Write for SinkWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.append(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The `MakeWriter` handed to `tracing_subscriber`.
#[derive(Clone)]
pub struct SinkMaker(pub Arc<LogSink>);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SinkMaker {
    type Writer = SinkWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        SinkWriter(&self.0)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An output that records what reached it.
    #[derive(Clone, Default)]
    pub(crate) struct Recorder(pub(crate) Arc<Mutex<Vec<u8>>>);

    impl Write for Recorder {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_reach_the_output_in_order_on_flush_and_past_the_limit() {
        let rec = Recorder::default();
        let sink = LogSink::start(Box::new(rec.clone()), Duration::from_secs(3600));
        let maker = SinkMaker(sink.clone());
        for i in 0..3 {
            let mut w = tracing_subscriber::fmt::MakeWriter::make_writer(&maker);
            w.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        assert!(rec.0.lock().unwrap().is_empty(), "buffered until flushed");
        sink.flush();
        assert_eq!(&*rec.0.lock().unwrap(), b"line 0\nline 1\nline 2\n");

        // Past the limit the caller writes the buffer out itself.
        let big = vec![b'x'; LIMIT];
        SinkWriter(&sink).write_all(&big).unwrap();
        assert_eq!(rec.0.lock().unwrap().len(), 21 + LIMIT);
    }
}
