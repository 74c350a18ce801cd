//! Checks PromQL expressions against what an exporter really serves: a parser for the PromQL the
//! ops assets use (selectors, ranges, functions, aggregations, binary operators with their
//! matching modifiers) and a walk that infers the labels each sub-expression carries, so a
//! renamed metric, a label that does not exist, a counter read without `rate()` or a division
//! whose sides never match is reported with the expression it is in.

use std::collections::{BTreeMap, BTreeSet};

/// Labels Prometheus adds to every scraped series (the scrape target's); `/metrics` has none.
pub const TARGET_LABELS: [&str; 2] = ["job", "instance"];

// ---------------------------------------------------------------------------------------------
// What the exporter serves
// ---------------------------------------------------------------------------------------------

/// How a series may be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only ever grows: a counter, or a histogram's `_bucket`, `_sum` and `_count`.
    Counter,
    Gauge,
}

/// One series name of the exposition (a histogram family gives three).
#[derive(Debug, Clone)]
pub struct Series {
    pub family: String,
    pub kind: Kind,
    /// Label names, each with the values seen.
    pub labels: BTreeMap<String, BTreeSet<String>>,
}

/// Every series name a Prometheus text exposition holds.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub series: BTreeMap<String, Series>,
}

impl Catalog {
    /// Reads the Prometheus text format (`# TYPE` lines and samples).
    pub fn parse(text: &str) -> Catalog {
        let mut types: BTreeMap<&str, &str> = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                    types.insert(name, kind);
                }
            }
        }
        let mut catalog = Catalog::default();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..name_end];
            let (family, kind) = match types.get(name) {
                Some(&"counter") => (name.to_string(), Kind::Counter),
                Some(_) => (name.to_string(), Kind::Gauge),
                None => {
                    let family = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|s| name.strip_suffix(s))
                        .filter(|f| matches!(types.get(f), Some(&"histogram" | &"summary")));
                    match family {
                        Some(f) => (f.to_string(), Kind::Counter),
                        None => (name.to_string(), Kind::Gauge),
                    }
                }
            };
            let series = catalog
                .series
                .entry(name.to_string())
                .or_insert_with(|| Series {
                    family,
                    kind,
                    labels: BTreeMap::new(),
                });
            if line[name_end..].starts_with('{') {
                for (label, value) in sample_labels(&line[name_end + 1..]) {
                    series.labels.entry(label).or_default().insert(value);
                }
            }
        }
        catalog
    }

    /// The metric families (a histogram once), of the series whose name starts with `prefix`.
    pub fn families(&self, prefix: &str) -> BTreeSet<String> {
        self.series
            .values()
            .filter(|s| s.family.starts_with(prefix))
            .map(|s| s.family.clone())
            .collect()
    }
}

/// The `name="value"` pairs of a sample line after its `{`.
fn sample_labels(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        let name = name.trim().trim_start_matches(',').trim().to_string();
        if name.is_empty() || chars.next() != Some('"') {
            return out;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.push((name, value));
        match chars.peek() {
            Some(',') => {
                chars.next();
            }
            _ => return out,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lexer
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// A number or a duration (`0.99`, `1e6`, `5m`).
    Num(String),
    Str(String),
    /// What is between `[` and `]`: a range or a subquery's `range:step`.
    Range(String),
    Punct(&'static str),
}

const PUNCTS: [&str; 19] = [
    "==", "!=", "=~", "!~", "<=", ">=", "(", ")", "{", "}", ",", "=", "<", ">", "+", "-", "*", "/",
    "%",
];

fn lex(src: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            out.push(Tok::Ident(chars[start..i].iter().collect()));
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric()
                    || chars[i] == '.'
                    || (matches!(chars[i], '+' | '-') && matches!(chars[i - 1], 'e' | 'E')))
            {
                i += 1;
            }
            out.push(Tok::Num(chars[start..i].iter().collect()));
        } else if matches!(c, '"' | '\'' | '`') {
            let mut value = String::new();
            i += 1;
            loop {
                let Some(&d) = chars.get(i) else {
                    return Err(format!("unterminated string in `{src}`"));
                };
                i += 1;
                if d == c {
                    break;
                }
                if d == '\\' && c != '`' {
                    let Some(&e) = chars.get(i) else {
                        return Err(format!("unterminated string in `{src}`"));
                    };
                    i += 1;
                    value.push(e);
                } else {
                    value.push(d);
                }
            }
            out.push(Tok::Str(value));
        } else if c == '[' {
            let start = i + 1;
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            if i == chars.len() {
                return Err(format!("unterminated `[` in `{src}`"));
            }
            out.push(Tok::Range(
                chars[start..i]
                    .iter()
                    .collect::<String>()
                    .trim()
                    .to_string(),
            ));
            i += 1;
        } else if c == '^' || c == '@' {
            out.push(Tok::Punct(if c == '^' { "^" } else { "@" }));
            i += 1;
        } else {
            let rest: String = chars[i..chars.len().min(i + 2)].iter().collect();
            let Some(p) = PUNCTS.iter().find(|p| rest.starts_with(**p)) else {
                return Err(format!("unexpected `{c}` in `{src}`"));
            };
            out.push(Tok::Punct(p));
            i += p.len();
        }
    }
    Ok(out)
}

/// A range or a subquery range/step: a duration, or a Grafana variable standing for one.
fn valid_range(text: &str) -> bool {
    text.split(':').all(|part| {
        let part = part.trim();
        part.is_empty() || is_duration(part) || is_grafana_interval(part)
    }) && !text.trim().is_empty()
}

/// `5m`, `1h30m`, `500ms`.
pub fn is_duration(text: &str) -> bool {
    let mut rest = text;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let Some(unit) = ["ms", "s", "m", "h", "d", "w", "y"]
            .iter()
            .find(|u| rest.starts_with(**u))
        else {
            return false;
        };
        rest = &rest[unit.len()..];
    }
    true
}

fn is_grafana_interval(text: &str) -> bool {
    matches!(
        text,
        "$__rate_interval" | "$__interval" | "$__range" | "${__rate_interval}" | "${__interval}"
    )
}

// ---------------------------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Matcher {
    pub label: String,
    pub op: &'static str,
    pub value: String,
}

/// `by (...)` / `without (...)`, or a binary operator's `on (...)` / `ignoring (...)`.
#[derive(Debug, Clone)]
pub struct Grouping {
    pub keyword: String,
    pub labels: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum Expr {
    Number,
    Str(String),
    Selector {
        name: String,
        matchers: Vec<Matcher>,
        range: bool,
    },
    Subquery(Box<Expr>),
    Unary(Box<Expr>),
    Aggregate {
        op: String,
        grouping: Option<Grouping>,
        param: Option<Box<Expr>>,
        arg: Box<Expr>,
    },
    Call {
        func: String,
        args: Vec<Expr>,
    },
    Binary {
        op: String,
        lhs: Box<Expr>,
        rhs: Box<Expr>,
        matching: Option<Grouping>,
        /// `group_left` / `group_right` and the labels it copies.
        group: Option<Grouping>,
    },
}

const AGGREGATIONS: [&str; 14] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// Binary operators by precedence (PromQL's, lowest first); `^` alone is right-associative.
fn precedence(tok: &Tok) -> Option<(u8, &'static str)> {
    Some(match tok {
        Tok::Ident(w) => match w.as_str() {
            "or" => (1, "or"),
            "and" => (2, "and"),
            "unless" => (2, "unless"),
            "atan2" => (5, "atan2"),
            _ => return None,
        },
        Tok::Punct(p) => match *p {
            "==" | "!=" | "<=" | "<" | ">=" | ">" => (3, *p),
            "+" | "-" => (4, *p),
            "*" | "/" | "%" => (5, *p),
            "^" => (6, "^"),
            _ => return None,
        },
        _ => return None,
    })
}

struct Parser<'a> {
    toks: Vec<Tok>,
    at: usize,
    src: &'a str,
}

/// Parses one PromQL expression.
pub fn parse(src: &str) -> Result<Expr, String> {
    let mut p = Parser {
        toks: lex(src)?,
        at: 0,
        src,
    };
    let e = p.expr(0)?;
    match p.peek() {
        None => Ok(e),
        Some(t) => Err(p.error(&format!("unexpected {t:?}"))),
    }
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at)
    }

    fn peek_at(&self, n: usize) -> Option<&Tok> {
        self.toks.get(self.at + n)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.at).cloned();
        self.at += 1;
        t
    }

    fn error(&self, what: &str) -> String {
        format!("{what} at token {} of `{}`", self.at, self.src)
    }

    fn is_punct(&self, p: &str) -> bool {
        matches!(self.peek(), Some(Tok::Punct(q)) if *q == p)
    }

    fn is_ident(&self, w: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(i)) if i == w)
    }

    fn expect(&mut self, p: &str) -> Result<(), String> {
        if self.is_punct(p) {
            self.at += 1;
            Ok(())
        } else {
            Err(self.error(&format!("expected `{p}`")))
        }
    }

    fn expr(&mut self, min: u8) -> Result<Expr, String> {
        let mut lhs = self.unary()?;
        while let Some((prec, op)) = self.peek().and_then(precedence) {
            if prec < min {
                break;
            }
            self.at += 1;
            if self.is_ident("bool") {
                self.at += 1;
            }
            let matching = match self.peek() {
                Some(Tok::Ident(w)) if w == "on" || w == "ignoring" => {
                    let keyword = w.clone();
                    self.at += 1;
                    Some(Grouping {
                        keyword,
                        labels: self.label_list()?,
                    })
                }
                _ => None,
            };
            let group = match self.peek() {
                Some(Tok::Ident(w)) if w == "group_left" || w == "group_right" => {
                    let keyword = w.clone();
                    self.at += 1;
                    // The label list is optional, and a `(` may as well open the right side:
                    // it is a list only when it holds names and commas alone.
                    let labels = if self.is_punct("(") && self.looks_like_label_list() {
                        self.label_list()?
                    } else {
                        Vec::new()
                    };
                    Some(Grouping { keyword, labels })
                }
                _ => None,
            };
            let next_min = if op == "^" { prec } else { prec + 1 };
            let rhs = self.expr(next_min)?;
            lhs = Expr::Binary {
                op: op.to_string(),
                lhs: Box::new(lhs),
                rhs: Box::new(rhs),
                matching,
                group,
            };
        }
        Ok(lhs)
    }

    fn looks_like_label_list(&self) -> bool {
        let mut n = 1;
        loop {
            match self.peek_at(n) {
                Some(Tok::Punct(")")) => return true,
                Some(Tok::Ident(_) | Tok::Punct(",")) => n += 1,
                _ => return false,
            }
        }
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.is_punct("-") || self.is_punct("+") {
            self.at += 1;
            return Ok(Expr::Unary(Box::new(self.unary()?)));
        }
        let e = self.primary()?;
        self.postfix(e)
    }

    fn primary(&mut self) -> Result<Expr, String> {
        match self.next() {
            Some(Tok::Punct("(")) => {
                let e = self.expr(0)?;
                self.expect(")")?;
                Ok(e)
            }
            Some(Tok::Num(n)) => {
                if n.parse::<f64>().is_ok() || is_duration(&n) {
                    Ok(Expr::Number)
                } else {
                    Err(self.error(&format!("bad number `{n}`")))
                }
            }
            Some(Tok::Str(s)) => Ok(Expr::Str(s)),
            Some(Tok::Punct("{")) => {
                self.at -= 1;
                let matchers = self.matchers()?;
                let name = matchers
                    .iter()
                    .find(|m| m.label == "__name__" && m.op == "=")
                    .map(|m| m.value.clone())
                    .ok_or_else(|| self.error("a selector without a metric name"))?;
                Ok(Expr::Selector {
                    name,
                    matchers,
                    range: false,
                })
            }
            Some(Tok::Ident(name)) => {
                let lower = name.to_ascii_lowercase();
                if lower == "inf" || lower == "nan" {
                    return Ok(Expr::Number);
                }
                let grouping_next =
                    matches!(self.peek(), Some(Tok::Ident(w)) if w == "by" || w == "without");
                if AGGREGATIONS.contains(&name.as_str()) && (self.is_punct("(") || grouping_next) {
                    return self.aggregate(name);
                }
                if self.is_punct("(") {
                    self.at += 1;
                    let args = self.args()?;
                    return Ok(Expr::Call { func: name, args });
                }
                let matchers = if self.is_punct("{") {
                    self.matchers()?
                } else {
                    Vec::new()
                };
                Ok(Expr::Selector {
                    name,
                    matchers,
                    range: false,
                })
            }
            other => Err(self.error(&format!("unexpected {other:?}"))),
        }
    }

    /// Arguments after `(`, through the closing `)`.
    fn args(&mut self) -> Result<Vec<Expr>, String> {
        let mut args = Vec::new();
        if self.is_punct(")") {
            self.at += 1;
            return Ok(args);
        }
        loop {
            args.push(self.expr(0)?);
            if self.is_punct(",") {
                self.at += 1;
                continue;
            }
            self.expect(")")?;
            return Ok(args);
        }
    }

    fn aggregate(&mut self, op: String) -> Result<Expr, String> {
        let mut grouping = self.grouping()?;
        self.expect("(")?;
        let mut args = self.args()?;
        if grouping.is_none() {
            grouping = self.grouping()?;
        }
        let arg = args
            .pop()
            .ok_or_else(|| self.error(&format!("`{op}` without an argument")))?;
        let param = args.pop().map(Box::new);
        if !args.is_empty() {
            return Err(self.error(&format!("too many arguments to `{op}`")));
        }
        Ok(Expr::Aggregate {
            op,
            grouping,
            param,
            arg: Box::new(arg),
        })
    }

    fn grouping(&mut self) -> Result<Option<Grouping>, String> {
        match self.peek() {
            Some(Tok::Ident(w)) if w == "by" || w == "without" => {
                let keyword = w.clone();
                self.at += 1;
                Ok(Some(Grouping {
                    keyword,
                    labels: self.label_list()?,
                }))
            }
            _ => Ok(None),
        }
    }

    fn label_list(&mut self) -> Result<Vec<String>, String> {
        self.expect("(")?;
        let mut labels = Vec::new();
        loop {
            match self.next() {
                Some(Tok::Punct(")")) => return Ok(labels),
                Some(Tok::Ident(l)) => labels.push(l),
                Some(Tok::Punct(",")) if !labels.is_empty() => {}
                other => return Err(self.error(&format!("expected a label name, got {other:?}"))),
            }
        }
    }

    fn matchers(&mut self) -> Result<Vec<Matcher>, String> {
        self.expect("{")?;
        let mut out = Vec::new();
        loop {
            let label = match self.next() {
                Some(Tok::Punct("}")) => return Ok(out),
                Some(Tok::Ident(l)) => l,
                other => return Err(self.error(&format!("expected a label name, got {other:?}"))),
            };
            let op = match self.next() {
                Some(Tok::Punct(op @ ("=" | "!=" | "=~" | "!~"))) => op,
                other => return Err(self.error(&format!("expected a matcher, got {other:?}"))),
            };
            let Some(Tok::Str(value)) = self.next() else {
                return Err(self.error("expected a quoted label value"));
            };
            out.push(Matcher { label, op, value });
            if self.is_punct(",") {
                self.at += 1;
            } else if !self.is_punct("}") {
                return Err(self.error("expected `,` or `}`"));
            }
        }
    }

    fn postfix(&mut self, mut e: Expr) -> Result<Expr, String> {
        loop {
            match self.peek().cloned() {
                Some(Tok::Range(r)) => {
                    self.at += 1;
                    if !valid_range(&r) {
                        return Err(self.error(&format!("bad range `[{r}]`")));
                    }
                    e = if r.contains(':') {
                        Expr::Subquery(Box::new(e))
                    } else if let Expr::Selector {
                        range: false,
                        name,
                        matchers,
                    } = e
                    {
                        Expr::Selector {
                            name,
                            matchers,
                            range: true,
                        }
                    } else {
                        return Err(self.error("a range on something other than a selector"));
                    };
                }
                Some(Tok::Ident(w)) if w == "offset" => {
                    self.at += 1;
                    if self.is_punct("-") {
                        self.at += 1;
                    }
                    match self.next() {
                        Some(Tok::Num(d)) if is_duration(&d) => {}
                        other => return Err(self.error(&format!("bad offset {other:?}"))),
                    }
                }
                Some(Tok::Punct("@")) => {
                    self.at += 1;
                    match self.next() {
                        Some(Tok::Num(_)) => {}
                        Some(Tok::Ident(f)) if f == "start" || f == "end" => {
                            self.expect("(")?;
                            self.expect(")")?;
                        }
                        other => return Err(self.error(&format!("bad `@` {other:?}"))),
                    }
                }
                _ => return Ok(e),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

/// What an expression evaluates to, for the checks.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    Scalar,
    Str(String),
    /// An instant or range vector and the labels its series may carry.
    Vector(BTreeSet<String>),
    /// After an error: checks on it are skipped (one mistake, one message).
    Unknown,
}

/// Where a selector sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Directly inside `rate`, `irate`, `increase` or `resets`.
    CounterRange,
    /// Directly inside another range function (`deriv`, `*_over_time`, ...).
    OtherRange,
    Instant,
    /// Grafana's `label_values(...)`: only its labels matter.
    Lookup,
}

/// Checks expressions against a catalog, collecting problems.
pub struct Checker<'a> {
    catalog: &'a Catalog,
    /// Whether a label value nobody exported yet is one the exporter can produce (a literal
    /// of its sources).
    known_value: &'a dyn Fn(&str) -> bool,
    pub problems: Vec<String>,
    /// Series names the checked expressions read.
    pub used: BTreeSet<String>,
    context: String,
}

fn set(labels: &[&str]) -> BTreeSet<String> {
    labels.iter().map(|l| l.to_string()).collect()
}

fn show(labels: &BTreeSet<String>) -> String {
    let v: Vec<&str> = labels.iter().map(String::as_str).collect();
    format!("({})", v.join(", "))
}

/// Functions whose result keeps the labels of their first vector argument.
const KEEPS_LABELS: [&str; 18] = [
    "abs",
    "ceil",
    "floor",
    "round",
    "sqrt",
    "exp",
    "ln",
    "log2",
    "log10",
    "sgn",
    "clamp",
    "clamp_min",
    "clamp_max",
    "sort",
    "sort_desc",
    "timestamp",
    "histogram_count",
    "histogram_sum",
];

impl<'a> Checker<'a> {
    pub fn new(catalog: &'a Catalog, known_value: &'a dyn Fn(&str) -> bool) -> Checker<'a> {
        Checker {
            catalog,
            known_value,
            problems: Vec::new(),
            used: BTreeSet::new(),
            context: String::new(),
        }
    }

    fn problem(&mut self, what: String) {
        self.problems.push(format!("{}: {what}", self.context));
    }

    /// Parses and checks `src` (found at `context`); the shape of its result.
    pub fn check(&mut self, context: &str, src: &str) -> Shape {
        self.context = format!(
            "{context}: `{}`",
            src.split_whitespace().collect::<Vec<_>>().join(" ")
        );
        match parse(src) {
            Ok(e) => self.walk(&e, Place::Instant),
            Err(e) => {
                self.problem(format!("does not parse: {e}"));
                Shape::Unknown
            }
        }
    }

    /// Checks Grafana's `label_values(selector, label)` variable query.
    pub fn check_label_values(&mut self, context: &str, query: &str) {
        self.context = format!("{context}: `{query}`");
        let inner = query
            .trim()
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'));
        let Some((selector, label)) = inner.and_then(|q| q.rsplit_once(',')) else {
            self.problem("not a `label_values(selector, label)` query".into());
            return;
        };
        let shape = match parse(selector) {
            Ok(e) => self.walk(&e, Place::Lookup),
            Err(e) => {
                self.problem(format!("does not parse: {e}"));
                return;
            }
        };
        self.require(&shape, &[label.trim().to_string()], "label_values");
    }

    /// Reports every label of `labels` that `shape` does not carry.
    pub fn require(&mut self, shape: &Shape, labels: &[String], user: &str) {
        if let Shape::Vector(have) = shape {
            for l in labels {
                if !have.contains(l) {
                    self.problem(format!(
                        "{user} uses label `{l}`, which the expression's series do not carry {}",
                        show(have)
                    ));
                }
            }
        }
    }

    fn walk(&mut self, e: &Expr, place: Place) -> Shape {
        match e {
            Expr::Number => Shape::Scalar,
            Expr::Str(s) => Shape::Str(s.clone()),
            Expr::Selector {
                name,
                matchers,
                range,
            } => self.selector(name, matchers, *range, place),
            Expr::Subquery(inner) => self.walk(inner, Place::Instant),
            Expr::Unary(inner) => self.walk(inner, place),
            Expr::Aggregate {
                op,
                grouping,
                param,
                arg,
            } => self.aggregate(op, grouping.as_ref(), param.as_deref(), arg),
            Expr::Call { func, args } => self.call(func, args),
            Expr::Binary {
                op,
                lhs,
                rhs,
                matching,
                group,
            } => self.binary(op, lhs, rhs, matching.as_ref(), group.as_ref()),
        }
    }

    fn selector(&mut self, name: &str, matchers: &[Matcher], range: bool, place: Place) -> Shape {
        if !name.starts_with("relay_") {
            self.problem(format!("`{name}` is not one of the relay's metrics"));
            return Shape::Unknown;
        }
        let Some(series) = self.catalog.series.get(name).cloned() else {
            let hint = if self.catalog.families("relay_").contains(name) {
                " (a histogram: read its _bucket, _sum or _count)"
            } else {
                ""
            };
            self.problem(format!(
                "metric `{name}` is not in the relay's /metrics{hint}"
            ));
            return Shape::Unknown;
        };
        self.used.insert(name.to_string());
        match (series.kind, place) {
            (_, Place::Lookup) => {}
            (Kind::Counter, Place::CounterRange)
            | (Kind::Gauge, Place::OtherRange | Place::Instant) => {}
            (Kind::Counter, _) => self.problem(format!(
                "counter `{name}` read without rate(), irate() or increase()"
            )),
            (Kind::Gauge, _) => self.problem(format!("gauge `{name}` inside a counter function")),
        }
        let wants_range = matches!(place, Place::CounterRange | Place::OtherRange);
        if range != wants_range && place != Place::Lookup {
            self.problem(format!(
                "`{name}` {} a range where {}",
                if range { "has" } else { "lacks" },
                if wants_range {
                    "one is needed"
                } else {
                    "an instant vector is needed"
                }
            ));
        }
        let mut labels: BTreeSet<String> = series.labels.keys().cloned().collect();
        labels.extend(set(&TARGET_LABELS));
        for m in matchers {
            if m.label == "__name__" {
                continue;
            }
            if !labels.contains(&m.label) {
                self.problem(format!(
                    "`{name}` has no label `{}` (it has {})",
                    m.label,
                    show(&labels)
                ));
                continue;
            }
            if TARGET_LABELS.contains(&m.label.as_str()) || m.value.contains('$') {
                continue;
            }
            // A regex is checked when it is a plain list of alternatives.
            let values: Vec<&str> = if m.op.ends_with('~') {
                if !m
                    .value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '|'))
                {
                    continue;
                }
                m.value.split('|').collect()
            } else {
                vec![m.value.as_str()]
            };
            for v in values {
                let seen = series.labels.get(&m.label).is_some_and(|s| s.contains(v));
                if !v.is_empty() && !seen && !(self.known_value)(v) {
                    self.problem(format!(
                        "`{name}{{{}}}`: the relay never gives `{}` the value \"{v}\"",
                        m.label, m.label
                    ));
                }
            }
        }
        Shape::Vector(labels)
    }

    fn aggregate(
        &mut self,
        op: &str,
        grouping: Option<&Grouping>,
        param: Option<&Expr>,
        arg: &Expr,
    ) -> Shape {
        let param_shape = param.map(|p| self.walk(p, Place::Instant));
        let inner = self.walk(arg, Place::Instant);
        if matches!(inner, Shape::Scalar | Shape::Str(_)) {
            self.problem(format!("`{op}` over a scalar"));
            return Shape::Unknown;
        }
        if let Some(g) = grouping {
            self.require(&inner, &g.labels, &format!("`{op} {}`", g.keyword));
        }
        let Shape::Vector(have) = inner else {
            return Shape::Unknown;
        };
        let grouped: BTreeSet<String> = g_labels(grouping);
        let mut out = match grouping.map(|g| g.keyword.as_str()) {
            _ if matches!(op, "topk" | "bottomk" | "limitk" | "limit_ratio") => have,
            Some("by") => grouped,
            Some(_) => have.difference(&grouped).cloned().collect(),
            None => BTreeSet::new(),
        };
        if op == "count_values" {
            if let Some(Shape::Str(label)) = param_shape {
                out.insert(label);
            }
        }
        Shape::Vector(out)
    }

    fn call(&mut self, func: &str, args: &[Expr]) -> Shape {
        let arg = |i: usize| args.get(i);
        match func {
            "rate" | "irate" | "increase" | "resets" | "delta" | "idelta" | "deriv" | "changes"
            | "predict_linear" | "absent_over_time" | "present_over_time" => {
                let place = if matches!(func, "rate" | "irate" | "increase" | "resets") {
                    Place::CounterRange
                } else {
                    Place::OtherRange
                };
                let shape = match arg(0) {
                    Some(a) => self.walk(a, place),
                    None => Shape::Unknown,
                };
                for a in args.iter().skip(1) {
                    self.walk(a, Place::Instant);
                }
                shape
            }
            f if f.ends_with("_over_time") => {
                // quantile_over_time(q, v) takes its range vector second.
                let (scalars, vector) = if f == "quantile_over_time" {
                    (1, 1)
                } else {
                    (0, 0)
                };
                for a in args.iter().take(scalars) {
                    self.walk(a, Place::Instant);
                }
                match arg(vector) {
                    Some(a) => self.walk(a, Place::OtherRange),
                    None => Shape::Unknown,
                }
            }
            "histogram_quantile" => {
                if let Some(q) = arg(0) {
                    self.walk(q, Place::Instant);
                }
                let shape = match arg(1) {
                    Some(a) => self.walk(a, Place::Instant),
                    None => Shape::Unknown,
                };
                match shape {
                    Shape::Vector(mut labels) => {
                        if !labels.remove("le") {
                            self.problem(
                                "histogram_quantile over series without `le` (aggregate the _bucket series keeping `le`)".into(),
                            );
                        }
                        Shape::Vector(labels)
                    }
                    other => other,
                }
            }
            "label_replace" | "label_join" => {
                let shapes: Vec<Shape> =
                    args.iter().map(|a| self.walk(a, Place::Instant)).collect();
                let sources: Vec<String> = match func {
                    "label_replace" => shapes.get(3).into_iter().cloned().collect::<Vec<_>>(),
                    _ => shapes.iter().skip(3).cloned().collect(),
                }
                .into_iter()
                .filter_map(|s| match s {
                    Shape::Str(l) if !l.is_empty() => Some(l),
                    _ => None,
                })
                .collect();
                let base = shapes.first().cloned().unwrap_or(Shape::Unknown);
                self.require(&base, &sources, func);
                match (base, shapes.get(1)) {
                    (Shape::Vector(mut labels), Some(Shape::Str(dst))) => {
                        labels.insert(dst.clone());
                        Shape::Vector(labels)
                    }
                    (other, _) => other,
                }
            }
            "vector" => {
                for a in args {
                    self.walk(a, Place::Instant);
                }
                Shape::Vector(BTreeSet::new())
            }
            "scalar" | "time" | "pi" => {
                for a in args {
                    self.walk(a, Place::Instant);
                }
                Shape::Scalar
            }
            "absent" => {
                for a in args {
                    self.walk(a, Place::Instant);
                }
                Shape::Vector(BTreeSet::new())
            }
            f if KEEPS_LABELS.contains(&f) => {
                let shapes: Vec<Shape> =
                    args.iter().map(|a| self.walk(a, Place::Instant)).collect();
                shapes.into_iter().next().unwrap_or(Shape::Unknown)
            }
            other => {
                self.problem(format!("unknown function `{other}`"));
                for a in args {
                    self.walk(a, Place::Instant);
                }
                Shape::Unknown
            }
        }
    }

    fn binary(
        &mut self,
        op: &str,
        lhs: &Expr,
        rhs: &Expr,
        matching: Option<&Grouping>,
        group: Option<&Grouping>,
    ) -> Shape {
        let l = self.walk(lhs, Place::Instant);
        let r = self.walk(rhs, Place::Instant);
        let set_op = matches!(op, "and" | "or" | "unless");
        let (ll, rl) = match (&l, &r) {
            (Shape::Vector(a), Shape::Vector(b)) => (a.clone(), b.clone()),
            (Shape::Unknown, _) | (_, Shape::Unknown) => return Shape::Unknown,
            (Shape::Vector(_), _) | (_, Shape::Vector(_)) if set_op => {
                self.problem(format!("`{op}` needs vectors on both sides"));
                return Shape::Unknown;
            }
            (Shape::Vector(_), _) => return l,
            (_, Shape::Vector(_)) => return r,
            _ => return Shape::Scalar,
        };
        let copied = g_labels(group);
        match matching {
            Some(m) if m.keyword == "on" => {
                let on = g_labels(Some(m));
                for (side, have) in [("left", &ll), ("right", &rl)] {
                    let missing: BTreeSet<String> = on.difference(have).cloned().collect();
                    if !missing.is_empty() {
                        self.problem(format!(
                            "`{op} on {}`: the {side} side lacks {}",
                            show(&on),
                            show(&missing)
                        ));
                    }
                }
            }
            _ if op == "or" => {}
            m => {
                let ignored = g_labels(m);
                let unknown: BTreeSet<String> = ignored
                    .iter()
                    .filter(|i| !ll.contains(*i) && !rl.contains(*i))
                    .cloned()
                    .collect();
                if !unknown.is_empty() {
                    self.problem(format!(
                        "`{op} ignoring` names labels neither side has: {}",
                        show(&unknown)
                    ));
                }
                let lm: BTreeSet<String> = ll.difference(&ignored).cloned().collect();
                let rm: BTreeSet<String> = rl.difference(&ignored).cloned().collect();
                if lm != rm {
                    self.problem(format!(
                        "`{op}` matches series on all their labels, but the left side has {} and the right side {}: no series would ever match (use on() or ignoring())",
                        show(&lm),
                        show(&rm)
                    ));
                }
            }
        }
        let mut out = match group.map(|g| g.keyword.as_str()) {
            Some("group_right") => {
                self.require(
                    &Shape::Vector(ll.clone()),
                    &copied.iter().cloned().collect::<Vec<_>>(),
                    "group_right",
                );
                rl.clone()
            }
            Some(_) => {
                self.require(
                    &Shape::Vector(rl.clone()),
                    &copied.iter().cloned().collect::<Vec<_>>(),
                    "group_left",
                );
                ll.clone()
            }
            None if op == "or" => ll.union(&rl).cloned().collect(),
            None => ll.clone(),
        };
        out.extend(copied);
        Shape::Vector(out)
    }
}

fn g_labels(g: Option<&Grouping>) -> BTreeSet<String> {
    g.map(|g| g.labels.iter().cloned().collect())
        .unwrap_or_default()
}
