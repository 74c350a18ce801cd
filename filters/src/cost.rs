//! Model prices and the cost of one request in integer micro-USD (DESIGN §9).
//!
//! Prices are micro-USD per million tokens (and per web search), so every amount is an integer;
//! the cost of a request is computed once from its totals and rounded half up, then multiplied
//! by the user's price rate (ten-thousandths) and rounded half up again.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::types::{SubUsage, TokenUsage};

/// Prices are per this many tokens.
const TOKENS_PER_PRICE: i128 = 1_000_000;

/// A price rate of this value means 1.0×.
const RATE_ONE: i128 = 10_000;

/// Prices of one model in micro-USD per million tokens, and per web search.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    /// Uncached input tokens.
    pub input: i64,
    /// Output tokens (reasoning included).
    pub output: i64,
    /// Cache writes with the 5-minute TTL; unset means 1.25× input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_5m: Option<i64>,
    /// Cache writes with the 1-hour TTL; unset means 2× input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_1h: Option<i64>,
    /// Cache reads (cached input); unset means 0.1× input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_read: Option<i64>,
    /// Micro-USD per web search the provider ran (not per million); unset means searches are
    /// not billed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_search: Option<i64>,
    /// Micro-USD per request that ran any web search, however many (Gemini 2.5 bills Google
    /// Search grounding per grounded prompt); unset: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_search_request: Option<i64>,
    /// The rate card for long prompts, for a model whose price depends on the prompt's length;
    /// unset means one price at every length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long_context: Option<LongContextPrice>,
    /// The rate card of requests the provider served at its priority tier (OpenAI
    /// `service_tier: "priority"`); unset: such requests at the standard prices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<TierPrice>,
    /// The rate card of requests served at the flex tier (OpenAI `service_tier: "flex"`);
    /// unset: the standard prices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flex: Option<TierPrice>,
    /// The rate card of requests run in Anthropic's fast mode (`usage.speed: "fast"`); unset:
    /// the standard prices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fast: Option<TierPrice>,
}

/// The service tier a provider says it served a request at (OpenAI `service_tier` in the
/// answer), which picks the model's rate card.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceTier {
    /// Standard processing (`default`, or no tier named).
    #[default]
    Standard,
    /// Priority processing, billed above standard.
    Priority,
    /// Flex processing, billed below standard.
    Flex,
    /// Anthropic fast mode (`usage.speed: "fast"`), billed above standard.
    Fast,
}

impl ServiceTier {
    /// The tier an OpenAI answer's `service_tier` names: `priority` (`fast` since OpenAI
    /// renamed it, as GPT-6 models answer) and `flex`, anything else standard. (Anthropic's
    /// fast mode is named apart, by `usage.speed`.)
    pub fn from_wire(name: &str) -> ServiceTier {
        match name {
            "priority" | "fast" => ServiceTier::Priority,
            "flex" => ServiceTier::Flex,
            _ => ServiceTier::Standard,
        }
    }

    /// The name records and metrics carry.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceTier::Standard => "standard",
            ServiceTier::Priority => "priority",
            ServiceTier::Flex => "flex",
            ServiceTier::Fast => "fast",
        }
    }
}

/// A model's rate card at a service tier, in micro-USD per million tokens; unset cache prices
/// are derived from this card's input as the standard ones are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierPrice {
    /// Uncached input tokens.
    pub input: i64,
    /// Output tokens (reasoning included).
    pub output: i64,
    /// Cache writes with the 5-minute TTL; unset means 1.25× this card's input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_5m: Option<i64>,
    /// Cache writes with the 1-hour TTL; unset means 2× this card's input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_1h: Option<i64>,
    /// Cache reads; unset means 0.1× this card's input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_read: Option<i64>,
}

/// A model's second rate card: a request whose prompt holds more than `above_tokens` tokens
/// (uncached input, cache reads and cache writes together) has every token billed at these
/// prices, output included, as the providers bill long prompts (Gemini Pro above 200K, Claude
/// Haiku 5.5 above 100K). Web searches keep the model's per-search price. At a service tier,
/// its own card for that tier applies where it has one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LongContextPrice {
    /// Prompts longer than this many tokens take these prices.
    pub above_tokens: u64,
    /// Uncached input tokens.
    pub input: i64,
    /// Output tokens (reasoning included).
    pub output: i64,
    /// Cache writes with the 5-minute TTL; unset means 1.25× this card's input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_5m: Option<i64>,
    /// Cache writes with the 1-hour TTL; unset means 2× this card's input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_1h: Option<i64>,
    /// Cache reads; unset means 0.1× this card's input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_read: Option<i64>,
    /// The card of long prompts served at the priority tier (GPT-5.6 and later: 2× this
    /// card); unset: long prompts take this card at that tier too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<TierPrice>,
    /// The card of long prompts served at the flex tier; unset: this card.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flex: Option<TierPrice>,
    /// The card of long prompts run in fast mode; unset: this card.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fast: Option<TierPrice>,
}

/// The per-million prices one request is billed at, defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rates {
    /// Uncached input.
    pub input: i64,
    /// Output.
    pub output: i64,
    /// 5-minute cache writes.
    pub cache_write_5m: i64,
    /// 1-hour cache writes.
    pub cache_write_1h: i64,
    /// Cache reads.
    pub cache_read: i64,
}

impl TierPrice {
    /// The card's prices with unset cache prices at 1.25×, 2× and 0.1× its input.
    fn rates(&self) -> Rates {
        let input = self.input;
        Rates {
            input,
            output: self.output,
            cache_write_5m: self.cache_write_5m.unwrap_or_else(|| scale(input, 5, 4)),
            cache_write_1h: self.cache_write_1h.unwrap_or_else(|| scale(input, 2, 1)),
            cache_read: self.cache_read.unwrap_or_else(|| scale(input, 1, 10)),
        }
    }
}

impl LongContextPrice {
    /// The card's prices, its threshold aside.
    fn card(&self) -> TierPrice {
        TierPrice {
            input: self.input,
            output: self.output,
            cache_write_5m: self.cache_write_5m,
            cache_write_1h: self.cache_write_1h,
            cache_read: self.cache_read,
        }
    }
}

impl ModelPrice {
    /// The prices a request whose prompt holds `prompt_tokens` tokens is billed at: the long
    /// context card's when the prompt is longer than its threshold, else the standard ones;
    /// unset cache prices at 1.25× (5-minute writes), 2× (1-hour writes) and 0.1× (reads) of
    /// that card's input, rounded half up.
    ///
    /// A request served at a service tier (priority, flex, fast mode) takes that tier's card
    /// where the model has one. Over the long-context threshold, the long card's own card for
    /// that tier applies where it has one (GPT-5.6 and later bill long prompts at 2× or 0.5×
    /// the long card), else the long card itself (earlier models' tier prices exclude long
    /// prompts).
    pub fn rates(&self, prompt_tokens: u64, tier: ServiceTier) -> Rates {
        let pick = |priority, flex, fast| match tier {
            ServiceTier::Priority => priority,
            ServiceTier::Flex => flex,
            ServiceTier::Fast => fast,
            ServiceTier::Standard => None,
        };
        let card = match self
            .long_context
            .filter(|long| prompt_tokens > long.above_tokens)
        {
            Some(long) => pick(long.priority, long.flex, long.fast).unwrap_or_else(|| long.card()),
            None => pick(self.priority, self.flex, self.fast).unwrap_or_else(|| self.standard()),
        };
        card.rates()
    }

    /// The standard card: the model's own prices.
    fn standard(&self) -> TierPrice {
        TierPrice {
            input: self.input,
            output: self.output,
            cache_write_5m: self.cache_write_5m,
            cache_write_1h: self.cache_write_1h,
            cache_read: self.cache_read,
        }
    }

    /// Every price of the model, all its cards: what must not be negative.
    pub fn all_prices(&self) -> impl Iterator<Item = i64> {
        let long = self.long_context.unwrap_or_default();
        let cards = [
            Some(self.standard()),
            self.long_context.map(|l| l.card()),
            long.priority,
            long.flex,
            long.fast,
            self.priority,
            self.flex,
            self.fast,
        ];
        cards
            .into_iter()
            .flatten()
            .flat_map(|c| {
                [
                    Some(c.input),
                    Some(c.output),
                    c.cache_write_5m,
                    c.cache_write_1h,
                    c.cache_read,
                ]
            })
            .chain([self.web_search, self.web_search_request])
            .flatten()
    }
}

/// Why a price list could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceError {
    /// A line is not part of the accepted format.
    #[error("pricing line {line}: {message}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// A model table lacks a required price.
    #[error("pricing model {model:?}: missing `{field}`")]
    MissingField {
        /// The model name.
        model: String,
        /// The missing key.
        field: &'static str,
    },
    /// The same model has two tables.
    #[error("pricing model {model:?} is defined twice")]
    DuplicateModel {
        /// The model name.
        model: String,
    },
}

/// A model's prices from a time on: a price change the list announces ahead (an
/// introductory price that ends, a list price that moves on a date).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PriceChange {
    /// Epoch ms from which `price` applies (a request received at or after it).
    pub from_ms: i64,
    /// The model's prices from then on, all its cards.
    pub price: ModelPrice,
}

/// A model's prices over time: one price (or none: the model is not priced until its first
/// change), and the changes that replace it on their dates, in date order. A request is
/// priced at the one in effect when the relay received it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceSchedule {
    first: Option<ModelPrice>,
    changes: Vec<PriceChange>,
}

impl PriceSchedule {
    /// One price at every time.
    pub fn new(price: ModelPrice) -> Self {
        PriceSchedule {
            first: Some(price),
            changes: Vec::new(),
        }
    }

    /// The prices in effect at `at_ms` (epoch ms); `None` before the first change of a model
    /// priced only from then.
    pub fn at(&self, at_ms: i64) -> Option<&ModelPrice> {
        match self.changes.iter().rev().find(|c| c.from_ms <= at_ms) {
            Some(c) => Some(&c.price),
            None => self.first.as_ref(),
        }
    }

    /// The changes that take effect after `now_ms`, in date order.
    pub fn upcoming(&self, now_ms: i64) -> &[PriceChange] {
        let past = self.changes.partition_point(|c| c.from_ms <= now_ms);
        &self.changes[past..]
    }

    /// `first` (`None`: not priced until the first change), then `changes` in date order; a
    /// change that changes nothing, or not later than the one before it, is dropped.
    pub fn with_changes(
        first: Option<ModelPrice>,
        changes: impl IntoIterator<Item = PriceChange>,
    ) -> PriceSchedule {
        let mut schedule = PriceSchedule {
            first,
            changes: Vec::new(),
        };
        for change in changes {
            let last = match schedule.changes.last() {
                Some(c) => Some(&c.price),
                None => schedule.first.as_ref(),
            };
            if last != Some(&change.price) {
                schedule.push(change);
            }
        }
        schedule
    }

    /// When the changes take effect, in order.
    pub fn change_times(&self) -> impl Iterator<Item = i64> + '_ {
        self.changes.iter().map(|c| c.from_ms)
    }

    /// Every price of the schedule, the first one first.
    pub fn prices(&self) -> impl Iterator<Item = &ModelPrice> {
        self.first
            .iter()
            .chain(self.changes.iter().map(|c| &c.price))
    }

    /// Adds a change after the last one; `false` (and nothing added) when it is not later.
    fn push(&mut self, change: PriceChange) -> bool {
        if self
            .changes
            .last()
            .is_some_and(|c| c.from_ms >= change.from_ms)
        {
            return false;
        }
        self.changes.push(change);
        true
    }
}

/// Model name → price schedule, with a fallback from dated model ids to their undated name.
///
/// Looked up two or three times a request: a hash map with a fast hash (the names are the
/// operator's, so no client chooses what collides), where an ordered map's string comparisons
/// cost a thousand instructions a lookup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceTable {
    models: HashMap<String, PriceSchedule, foldhash::fast::RandomState>,
}

impl PriceTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads a price list in the format of `conf/pricing.toml`.
    ///
    /// The accepted format is the TOML subset that file uses: comments, blank lines,
    /// `[models."<name>"]` (or `[models.<bare-name>]`) tables, and `key = integer` lines with
    /// keys `input`, `output` (required), `cache_write_5m`, `cache_write_1h`, `cache_read`,
    /// `web_search`, `web_search_request`; right after a model's table, optional sub-tables:
    /// `[models."<name>".long_context]` with `above_tokens` (1 or more), `input`, `output`
    /// (required) and the three cache prices, `.priority`, `.flex`, `.fast` with `input`,
    /// `output` (required) and the three cache prices, and `.long_context.priority` (`.flex`,
    /// `.fast`) alike, for long prompts at that tier, where the model has a long card; and
    /// after them, in date order, `[models."<name>".from."<date>"]` with the same keys and
    /// sub-tables (`.from."<date>".priority`, ...), the model's whole prices from `<date>`
    /// (`YYYY-MM-DD`, midnight UTC, or `YYYY-MM-DDTHH:MM:SSZ`) on, each sub-table spelling
    /// its date as its change's table does.
    /// Anything else is an error, so a typo never silently prices a model at 0.
    // Hand-written because the filters crate has no TOML dependency.
    pub fn from_toml_str(s: &str) -> Result<PriceTable, PriceError> {
        let mut table = PriceTable::new();
        let mut current: Option<ParsedModel> = None;
        for (index, raw) in s.lines().enumerate() {
            let line_no = index + 1;
            let line = strip_comment(raw).trim();
            if line.is_empty() {
                continue;
            }
            if line.starts_with('[') {
                let (name, from, section) =
                    parse_table_header(line).map_err(|m| syntax(line_no, m))?;
                if section != Section::Model {
                    let table_name = section.table_name();
                    match current.as_mut() {
                        Some(model) if model.name == name && model.from == from => {
                            let card = model.card_mut(section);
                            if card.is_some() {
                                return Err(syntax(
                                    line_no,
                                    format!("`{table_name}` is defined twice"),
                                ));
                            }
                            *card = Some(PartialPrice::default());
                            model.section = section;
                            continue;
                        }
                        _ => {
                            let version = version_path(from.as_ref());
                            return Err(syntax(
                                line_no,
                                format!(
                                    "`[models.\"{name}\"{version}.{table_name}]` must follow \
                                     `[models.\"{name}\"{version}]` (or its other tables)"
                                ),
                            ));
                        }
                    }
                }
                if let Some((from_ms, text)) = &from {
                    // A change continues its model's tables, later than the one before.
                    let follows = current.as_ref().is_some_and(|m| {
                        m.name == name && m.starts_ms().is_none_or(|earlier| earlier < *from_ms)
                    });
                    if !follows {
                        return Err(syntax(
                            line_no,
                            format!(
                                "`[models.\"{name}\".from.\"{text}\"]` must follow \
                                 `[models.\"{name}\"]` and its earlier changes, in date order"
                            ),
                        ));
                    }
                }
                if let Some(model) = current.take() {
                    table.add_parsed(model)?;
                }
                if from.is_none() && table.models.contains_key(&name) {
                    return Err(PriceError::DuplicateModel { model: name });
                }
                current = Some(ParsedModel {
                    name,
                    from,
                    section: Section::Model,
                    base: PartialPrice::default(),
                    long: None,
                    priority: None,
                    flex: None,
                    fast: None,
                    long_priority: None,
                    long_flex: None,
                    long_fast: None,
                });
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(syntax(
                    line_no,
                    "expected `[models.\"<name>\"]` or `key = integer`",
                ));
            };
            let key = key.trim();
            let Some(model) = current.as_mut() else {
                return Err(syntax(
                    line_no,
                    format!("`{key}` outside a [models.\"<name>\"] table"),
                ));
            };
            let section = model.section;
            let slot = match (section, key) {
                (Section::LongContext, "above_tokens") => {
                    model.long.as_mut().map(|long| &mut long.above_tokens)
                }
                (Section::Model, _) => model.base.slot(key),
                (_, "web_search" | "web_search_request") => {
                    return Err(syntax(
                        line_no,
                        format!(
                            "`{key}` belongs to the model's table, not `{}`: searches \
                             cost the same whatever the prompt or the service tier",
                            section.table_name()
                        ),
                    ))
                }
                (_, "above_tokens") => {
                    return Err(syntax(
                        line_no,
                        "`above_tokens` belongs in a `long_context` table",
                    ))
                }
                (_, _) => model.card_mut(section).as_mut().and_then(|p| p.slot(key)),
            };
            let Some(slot) = slot else {
                return Err(syntax(line_no, format!("unknown key `{key}`")));
            };
            if slot.is_some() {
                return Err(syntax(line_no, format!("`{key}` is set twice")));
            }
            let price = parse_price(value.trim()).ok_or_else(|| {
                let unit = match key {
                    "web_search" => "micro-USD per search",
                    "web_search_request" => "micro-USD per request that searched",
                    "above_tokens" => "tokens",
                    _ => "micro-USD per million tokens",
                };
                syntax(
                    line_no,
                    format!("`{key}` must be a non-negative integer ({unit})"),
                )
            })?;
            if key == "above_tokens" && price == 0 {
                // A card for every prompt is no long-context card: set the model's prices.
                return Err(syntax(line_no, "`above_tokens` must be 1 or more"));
            }
            *slot = Some(price);
        }
        if let Some(model) = current {
            table.add_parsed(model)?;
        }
        Ok(table)
    }

    /// Sets the price of `model` at every time, replacing any earlier one.
    pub fn insert(&mut self, model: &str, price: ModelPrice) {
        self.insert_schedule(model, PriceSchedule::new(price));
    }

    /// Sets the prices of `model` over time, replacing any earlier ones (admin overrides go
    /// on top).
    pub fn insert_schedule(&mut self, model: &str, schedule: PriceSchedule) {
        self.models.insert(model.to_owned(), schedule);
    }

    /// The price schedule of `model`: its exact name, else its name without a trailing
    /// `-YYYYMMDD` or `-YYYY-MM-DD` (so `claude-sonnet-4-5-20250929` finds
    /// `claude-sonnet-4-5`).
    ///
    /// Nothing else is stripped, so a model is never priced as another one
    /// (`claude-opus-4-1` does not find `claude-opus-4`).
    pub fn schedule(&self, model: &str) -> Option<&PriceSchedule> {
        self.models
            .get(model)
            .or_else(|| self.models.get(strip_date_suffix(model)?))
    }

    /// The price of `model` (found as [`PriceTable::schedule`] finds it) in effect at `at_ms`.
    pub fn get_at(&self, model: &str, at_ms: i64) -> Option<&ModelPrice> {
        self.schedule(model).and_then(|s| s.at(at_ms))
    }

    /// The price of `model` in effect now.
    pub fn get(&self, model: &str) -> Option<&ModelPrice> {
        self.get_at(model, crate::types::now_ms())
    }

    /// Whether `model` has a price at some time (maybe not now: [`PriceTable::get_at`]).
    pub fn contains(&self, model: &str) -> bool {
        self.schedule(model).is_some()
    }

    /// Every priced model, with its prices over time, in the order of their names.
    pub fn schedules(&self) -> impl Iterator<Item = (&str, &PriceSchedule)> {
        let mut all: Vec<(&str, &PriceSchedule)> = self
            .models
            .iter()
            .map(|(name, schedule)| (name.as_str(), schedule))
            .collect();
        all.sort_unstable_by(|a, b| a.0.cmp(b.0));
        all.into_iter()
    }

    /// Number of priced models.
    pub fn len(&self) -> usize {
        self.models.len()
    }

    /// Whether no model is priced.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    fn add_parsed(&mut self, parsed: ParsedModel) -> Result<(), PriceError> {
        let ParsedModel {
            name,
            from,
            base,
            long,
            priority,
            flex,
            fast,
            long_priority,
            long_flex,
            long_fast,
            ..
        } = parsed;
        let label = match &from {
            Some((_, text)) => format!("{name} from {text}"),
            None => name.clone(),
        };
        let missing = |field| PriceError::MissingField {
            model: label.clone(),
            field,
        };
        let tier = |card: Option<PartialPrice>, input_field, output_field| {
            card.map(|c| {
                Ok(TierPrice {
                    input: c.input.ok_or_else(|| missing(input_field))?,
                    output: c.output.ok_or_else(|| missing(output_field))?,
                    cache_write_5m: c.cache_write_5m,
                    cache_write_1h: c.cache_write_1h,
                    cache_read: c.cache_read,
                })
            })
            .transpose()
        };
        let long_tiers = [
            tier(
                long_priority,
                "long_context.priority.input",
                "long_context.priority.output",
            )?,
            tier(
                long_flex,
                "long_context.flex.input",
                "long_context.flex.output",
            )?,
            tier(
                long_fast,
                "long_context.fast.input",
                "long_context.fast.output",
            )?,
        ];
        if long.is_none() && long_tiers.iter().any(Option::is_some) {
            return Err(missing("long_context"));
        }
        let long_context = match long {
            None => None,
            Some(l) => Some(LongContextPrice {
                above_tokens: l
                    .above_tokens
                    .ok_or_else(|| missing("long_context.above_tokens"))?
                    .unsigned_abs(),
                input: l.input.ok_or_else(|| missing("long_context.input"))?,
                output: l.output.ok_or_else(|| missing("long_context.output"))?,
                cache_write_5m: l.cache_write_5m,
                cache_write_1h: l.cache_write_1h,
                cache_read: l.cache_read,
                priority: long_tiers[0],
                flex: long_tiers[1],
                fast: long_tiers[2],
            }),
        };
        let priority = tier(priority, "priority.input", "priority.output")?;
        let flex = tier(flex, "flex.input", "flex.output")?;
        let fast = tier(fast, "fast.input", "fast.output")?;
        let price = ModelPrice {
            input: base.input.ok_or_else(|| missing("input"))?,
            output: base.output.ok_or_else(|| missing("output"))?,
            cache_write_5m: base.cache_write_5m,
            cache_write_1h: base.cache_write_1h,
            cache_read: base.cache_read,
            web_search: base.web_search,
            web_search_request: base.web_search_request,
            long_context,
            priority,
            flex,
            fast,
        };
        match from {
            None => {
                self.models.insert(name, PriceSchedule::new(price));
            }
            Some((from_ms, _)) => {
                // The header's checks made this the model's latest change.
                let added = self
                    .models
                    .get_mut(&name)
                    .is_some_and(|schedule| schedule.push(PriceChange { from_ms, price }));
                if !added {
                    // The header's checks rule this out; should they not, nothing is dropped.
                    return Err(PriceError::Syntax {
                        line: 0,
                        message: format!("{label}: not after the model's earlier prices"),
                    });
                }
            }
        }
        Ok(())
    }
}

/// The cost of one request in micro-USD.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    /// Cost at list price, before the user's price rate.
    pub base: i64,
    /// Cost charged to the user: `base` × price rate.
    pub billed: i64,
    /// Tokens were used but the model has no price (billed 0, counted in a metric).
    pub unpriced: bool,
}

/// Prices `usage` of `model` and applies `price_rate` (ten-thousandths: 10000 = 1.0×).
///
/// base = round_half_up((Σ tokens × price per million + searches × price per search × 1 000 000)
/// / 1 000 000), computed once from the totals (no per-category rounding);
/// billed = round_half_up(base × price_rate / 10 000). Web searches of a model without a
/// `web_search` price cost nothing. A missing or unknown model costs 0 and is flagged
/// `unpriced`; a request without any tokens or searches costs 0 and is not flagged, since there
/// was nothing to price. At the prices in effect now; [`compute_cost_at`] prices a request at
/// those of the time it arrived.
pub fn compute_cost(
    table: &PriceTable,
    model: Option<&str>,
    usage: &TokenUsage,
    price_rate: i64,
) -> Cost {
    compute_cost_at(
        table,
        model,
        usage,
        ServiceTier::Standard,
        crate::types::now_ms(),
        price_rate,
    )
}

/// [`compute_cost`] of a request received at `at_ms` (epoch ms: the prices then in effect,
/// [`PriceSchedule::at`]) that the provider served at `tier`: at the model's card for that
/// tier where it has one ([`ModelPrice::rates`]).
pub fn compute_cost_at(
    table: &PriceTable,
    model: Option<&str>,
    usage: &TokenUsage,
    tier: ServiceTier,
    at_ms: i64,
    price_rate: i64,
) -> Cost {
    if usage.is_empty() {
        return Cost::default();
    }
    let Some(price) = model.and_then(|m| table.get_at(m, at_ms)) else {
        return Cost {
            base: 0,
            billed: 0,
            unpriced: true,
        };
    };
    let rates = price.rates(usage.prompt_tokens(), tier);
    let terms = [
        (usage.input_tokens, rates.input),
        (usage.output_tokens, rates.output),
        (usage.cache_write_5m_tokens, rates.cache_write_5m),
        (usage.cache_write_1h_tokens, rates.cache_write_1h),
        (usage.cache_read_tokens, rates.cache_read),
    ];
    // Saturating: absurd counts from a hostile upstream must not panic or wrap.
    let tokens_x_million = terms.iter().fold(0i128, |sum, &(tokens, per_million)| {
        sum.saturating_add(i128::from(tokens).saturating_mul(i128::from(per_million)))
    });
    // Per search, and once for a request that searched at all where the model bills so.
    let searched = if usage.web_search_requests > 0 {
        price.web_search_request.unwrap_or(0)
    } else {
        0
    };
    let searches_x_million = i128::from(usage.web_search_requests)
        .saturating_mul(i128::from(price.web_search.unwrap_or(0)))
        .saturating_add(i128::from(searched))
        .saturating_mul(TOKENS_PER_PRICE);
    let micro_usd_x_million = tokens_x_million.saturating_add(searches_x_million);
    let base = clamp_i64(div_round_half_up(micro_usd_x_million, TOKENS_PER_PRICE));
    let billed = clamp_i64(div_round_half_up(
        i128::from(base).saturating_mul(i128::from(price_rate)),
        RATE_ONE,
    ));
    Cost {
        base,
        billed,
        unpriced: false,
    }
}

/// [`compute_cost_at`] of a request that ran other passes besides its answer (a compaction's
/// summary on its own model, an advisor's on the advisor's), each priced on its own at its
/// model (its own prompt against the long-context threshold): the base costs are summed, then
/// the rate is applied once. Any part with tokens and no price flags the whole `unpriced`
/// (that part costing 0).
pub fn compute_cost_with_subs(
    table: &PriceTable,
    model: Option<&str>,
    usage: &TokenUsage,
    tier: ServiceTier,
    subs: &[SubUsage],
    at_ms: i64,
    price_rate: i64,
) -> Cost {
    let one = RATE_ONE as i64;
    let main = compute_cost_at(table, model, usage, tier, at_ms, one);
    let (base, unpriced) = subs
        .iter()
        .fold((main.base, main.unpriced), |(base, unpriced), sub| {
            let part = match &sub.model {
                None => compute_cost_at(table, model, &sub.tokens, tier, at_ms, one),
                Some(other) => compute_cost_at(
                    table,
                    Some(other),
                    &sub.tokens,
                    ServiceTier::Standard,
                    at_ms,
                    one,
                ),
            };
            (base.saturating_add(part.base), unpriced || part.unpriced)
        });
    Cost {
        base,
        billed: clamp_i64(div_round_half_up(
            i128::from(base).saturating_mul(i128::from(price_rate)),
            RATE_ONE,
        )),
        unpriced,
    }
}

/// Body bytes counted as one input token when a request's cost is estimated. JSON text runs
/// about 3 to 5 bytes a token; the estimate is a hold, not a bill.
const BODY_BYTES_PER_TOKEN: u64 = 4;

/// Output tokens assumed for a request that sets no output cap.
pub const DEFAULT_OUTPUT_ESTIMATE: u64 = 4096;

/// Input tokens a request body of `body_len` bytes is estimated to hold (one per
/// [`BODY_BYTES_PER_TOKEN`] bytes, as cost holds count it).
pub fn estimate_input_tokens(body_len: usize) -> u64 {
    body_len as u64 / BODY_BYTES_PER_TOKEN
}

/// What a request is expected to cost at most, before it is sent: its body as uncached input
/// tokens (one per [`BODY_BYTES_PER_TOKEN`] bytes) and its output cap (else
/// [`DEFAULT_OUTPUT_ESTIMATE`]) as output tokens, priced for `model` at `price_rate`. 0 when the
/// model has no price; at the prices in effect now. What is held against the key's cost limits
/// while the request is in flight ([`estimate_cost_at`], at the request's arrival and tier).
pub fn estimate_cost(
    table: &PriceTable,
    model: Option<&str>,
    body_len: usize,
    max_output_tokens: Option<u64>,
    price_rate: i64,
) -> i64 {
    estimate_cost_at(
        table,
        model,
        body_len,
        max_output_tokens,
        ServiceTier::Standard,
        crate::types::now_ms(),
        price_rate,
    )
}

/// [`estimate_cost`] of a request received at `at_ms` (epoch ms) that asks for a service
/// tier: at that tier's card, where the model has one.
pub fn estimate_cost_at(
    table: &PriceTable,
    model: Option<&str>,
    body_len: usize,
    max_output_tokens: Option<u64>,
    tier: ServiceTier,
    at_ms: i64,
    price_rate: i64,
) -> i64 {
    let usage = TokenUsage {
        input_tokens: estimate_input_tokens(body_len),
        output_tokens: max_output_tokens.unwrap_or(DEFAULT_OUTPUT_ESTIMATE),
        ..TokenUsage::default()
    }
    .clamped()
    .0;
    compute_cost_at(table, model, &usage, tier, at_ms, price_rate).billed
}

/// `n / d` rounded half up (toward +∞ on a tie), for `d > 0`.
fn div_round_half_up(n: i128, d: i128) -> i128 {
    // floor((2n + d) / 2d) = floor(n/d + 1/2), exact for any d.
    n.saturating_mul(2)
        .saturating_add(d)
        .div_euclid(d.saturating_mul(2))
}

fn clamp_i64(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

/// `v × num / den`, rounded half up.
fn scale(v: i64, num: i128, den: i128) -> i64 {
    clamp_i64(div_round_half_up(i128::from(v).saturating_mul(num), den))
}

/// `model` without a trailing `-YYYYMMDD` or `-YYYY-MM-DD` date, if it has one.
fn strip_date_suffix(model: &str) -> Option<&str> {
    let b = model.as_bytes();
    let digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    let plausible = |month: &[u8], day: &[u8]| {
        let n = |s: &[u8]| {
            s.iter()
                .fold(0u32, |acc, &c| acc * 10 + u32::from(c - b'0'))
        };
        (1..=12).contains(&n(month)) && (1..=31).contains(&n(day))
    };
    // -YYYYMMDD (Anthropic: claude-sonnet-4-5-20250929)
    if b.len() > 9 {
        let (head, tail) = b.split_at(b.len() - 9);
        if tail[0] == b'-' && digits(&tail[1..]) && plausible(&tail[5..7], &tail[7..9]) {
            return std::str::from_utf8(head).ok();
        }
    }
    // -YYYY-MM-DD (OpenAI: gpt-4o-2024-08-06)
    if b.len() > 11 {
        let (head, tail) = b.split_at(b.len() - 11);
        if tail[0] == b'-'
            && tail[5] == b'-'
            && tail[8] == b'-'
            && digits(&tail[1..5])
            && digits(&tail[6..8])
            && digits(&tail[9..11])
            && plausible(&tail[6..8], &tail[9..11])
        {
            return std::str::from_utf8(head).ok();
        }
    }
    None
}

/// The prices of one card read so far.
#[derive(Default)]
struct PartialPrice {
    input: Option<i64>,
    output: Option<i64>,
    cache_write_5m: Option<i64>,
    cache_write_1h: Option<i64>,
    cache_read: Option<i64>,
    web_search: Option<i64>,
    web_search_request: Option<i64>,
    above_tokens: Option<i64>,
}

impl PartialPrice {
    /// Where the price named `key` goes (`above_tokens` is matched by the caller).
    fn slot(&mut self, key: &str) -> Option<&mut Option<i64>> {
        Some(match key {
            "input" => &mut self.input,
            "output" => &mut self.output,
            "cache_write_5m" => &mut self.cache_write_5m,
            "cache_write_1h" => &mut self.cache_write_1h,
            "cache_read" => &mut self.cache_read,
            "web_search" => &mut self.web_search,
            "web_search_request" => &mut self.web_search_request,
            _ => return None,
        })
    }
}

/// A model's tables read so far: its own and its rate cards', for its first price or for a
/// change from a date.
struct ParsedModel {
    name: String,
    /// The change's start (epoch ms) and its text; `None` for the model's first price.
    from: Option<(i64, String)>,
    /// The table the lines go to.
    section: Section,
    base: PartialPrice,
    long: Option<PartialPrice>,
    priority: Option<PartialPrice>,
    flex: Option<PartialPrice>,
    fast: Option<PartialPrice>,
    long_priority: Option<PartialPrice>,
    long_flex: Option<PartialPrice>,
    long_fast: Option<PartialPrice>,
}

impl ParsedModel {
    /// When these tables take effect; `None` for the model's first price.
    fn starts_ms(&self) -> Option<i64> {
        self.from.as_ref().map(|f| f.0)
    }

    /// The card a sub-table fills (the model's own table has none: `long`'s slot is
    /// returned for it, never used).
    fn card_mut(&mut self, section: Section) -> &mut Option<PartialPrice> {
        match section {
            Section::Priority => &mut self.priority,
            Section::Flex => &mut self.flex,
            Section::Fast => &mut self.fast,
            Section::LongPriority => &mut self.long_priority,
            Section::LongFlex => &mut self.long_flex,
            Section::LongFast => &mut self.long_fast,
            Section::LongContext | Section::Model => &mut self.long,
        }
    }
}

/// Which table of a model a header opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    /// `[models."<name>"]`
    Model,
    /// `[models."<name>".long_context]`
    LongContext,
    /// `[models."<name>".priority]`
    Priority,
    /// `[models."<name>".flex]`
    Flex,
    /// `[models."<name>".fast]`
    Fast,
    /// `[models."<name>".long_context.priority]`
    LongPriority,
    /// `[models."<name>".long_context.flex]`
    LongFlex,
    /// `[models."<name>".long_context.fast]`
    LongFast,
}

impl Section {
    /// The sub-table's name.
    fn table_name(self) -> &'static str {
        match self {
            Section::Model => "models",
            Section::LongContext => "long_context",
            Section::Priority => "priority",
            Section::Flex => "flex",
            Section::Fast => "fast",
            Section::LongPriority => "long_context.priority",
            Section::LongFlex => "long_context.flex",
            Section::LongFast => "long_context.fast",
        }
    }
}

fn syntax(line: usize, message: impl Into<String>) -> PriceError {
    PriceError::Syntax {
        line,
        message: message.into(),
    }
}

/// The line without its `#` comment (a `#` inside a quoted key is kept).
fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '#') => return &line[..i],
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), _) if c == q => quote = None,
            _ => {}
        }
    }
    line
}

/// `.from."<date>"` of a change's tables, nothing for the model's first price.
fn version_path(from: Option<&(i64, String)>) -> String {
    from.map(|(_, text)| format!(".from.\"{text}\""))
        .unwrap_or_default()
}

/// Epoch ms of `YYYY-MM-DD` (midnight UTC) or `YYYY-MM-DDTHH:MM:SSZ`: when a price change takes
/// effect.
pub fn parse_from(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = b.get(range)?;
        digits.iter().try_fold(0i64, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let days_in_month = *month_days.get(usize::try_from(month.checked_sub(1)?).ok()?)?;
    if year < 1970 || day < 1 || day > days_in_month {
        return None;
    }
    let seconds = match &b[10..] {
        [] => 0,
        [b'T', _, _, b':', _, _, b':', _, _, b'Z'] => {
            let (h, m, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
            if h > 23 || m > 59 || s > 59 {
                return None;
            }
            h * 3600 + m * 60 + s
        }
        _ => return None,
    };
    // Days since 1970-01-01 of a date in the proleptic Gregorian calendar.
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let year_of_era = y - era * 400;
    let day_of_year = (153 * m + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    Some((days * 86_400 + seconds) * 1000)
}

/// The model name of a `[models."<name>"]` / `[models.<name>]` header, the change it belongs
/// to (`.from."<date>"`: its epoch ms and text) and the table it opens.
#[allow(clippy::type_complexity)]
fn parse_table_header(line: &str) -> Result<(String, Option<(i64, String)>, Section), String> {
    let bad = || format!("expected `[models.\"<name>\"]`, found `{line}`");
    let inner = line
        .strip_prefix('[')
        .and_then(|l| l.strip_suffix(']'))
        .ok_or_else(bad)?
        .trim();
    if inner.starts_with('[') {
        return Err("arrays of tables are not supported".into());
    }
    let key = inner
        .strip_prefix("models")
        .map(str::trim_start)
        .and_then(|k| k.strip_prefix('.'))
        .map(str::trim_start)
        .ok_or_else(bad)?;
    let (name, rest) = match key.chars().next() {
        Some(q @ ('"' | '\'')) => {
            let body = &key[1..];
            let end = body.find(q).ok_or_else(bad)?;
            let name = &body[..end];
            if q == '"' && name.contains('\\') {
                return Err("escapes in model names are not supported".into());
            }
            (name, body[end + 1..].trim())
        }
        _ => {
            let end = key.find(['.', ' ', '\t']).unwrap_or(key.len());
            let name = &key[..end];
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
            {
                return Err(bad());
            }
            (name, key[end..].trim())
        }
    };
    if name.is_empty() {
        return Err("empty model name".into());
    }
    let mut from = None;
    let section = match rest {
        "" => Section::Model,
        _ => {
            let Some(path) = rest.strip_prefix('.') else {
                return Err(bad());
            };
            let mut parts: Vec<&str> = path.split('.').map(str::trim).collect();
            if parts.first() == Some(&"from") {
                let Some(&date) = parts.get(1) else {
                    return Err(format!(
                        "`from` of model {name:?} needs a date: `from.\"YYYY-MM-DD\"`"
                    ));
                };
                // Quoted, or a TOML bare key (a date without its time).
                let text = date
                    .strip_prefix('"')
                    .and_then(|d| d.strip_suffix('"'))
                    .or_else(|| date.strip_prefix('\'')?.strip_suffix('\''))
                    .or_else(|| {
                        date.bytes()
                            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
                            .then_some(date)
                    })
                    .unwrap_or_default();
                let from_ms = parse_from(text).ok_or_else(|| {
                    format!(
                        "`from.{date}` of model {name:?}: the date must be `YYYY-MM-DD` (midnight \
                         UTC) or `YYYY-MM-DDTHH:MM:SSZ`, a real date from 1970 on"
                    )
                })?;
                from = Some((from_ms, text.to_owned()));
                parts.drain(..2);
            }
            match parts.as_slice() {
                [] => Section::Model,
                ["long_context"] => Section::LongContext,
                ["priority"] => Section::Priority,
                ["flex"] => Section::Flex,
                ["fast"] => Section::Fast,
                ["long_context", "priority"] => Section::LongPriority,
                ["long_context", "flex"] => Section::LongFlex,
                ["long_context", "fast"] => Section::LongFast,
                _ => {
                    return Err(format!(
                        "unknown table `{}` of model {name:?} (`long_context`, `priority`, \
                         `flex`, `fast`, `long_context.` and a tier, or `from.\"<date>\"` and \
                         any of them)",
                        path.trim()
                    ))
                }
            }
        }
    };
    Ok((name.to_owned(), from, section))
}

/// A TOML decimal integer (`3000000`, `3_000_000`) that is not negative.
fn parse_price(value: &str) -> Option<i64> {
    let digits = value.strip_prefix('+').unwrap_or(value);
    let bytes = digits.as_bytes();
    let first = *bytes.first()?;
    let last = *bytes.last()?;
    // TOML: underscores only between digits, no leading zeros.
    if !first.is_ascii_digit() || !last.is_ascii_digit() || digits.contains("__") {
        return None;
    }
    if first == b'0' && bytes.len() > 1 {
        return None;
    }
    bytes
        .iter()
        .filter(|&&c| c != b'_')
        .try_fold(0i64, |acc, &c| {
            if !c.is_ascii_digit() {
                return None;
            }
            acc.checked_mul(10)?.checked_add(i64::from(c - b'0'))
        })
}

/// Where the cost filter reads the current price table from (the binary's cache).
pub trait PriceSource: Send + Sync {
    /// The current table.
    fn table(&self) -> std::sync::Arc<PriceTable>;
}

/// The `cost` filter: prices the metered usage once, at the end of the exchange.
pub struct CostFilter {
    prices: std::sync::Arc<dyn PriceSource>,
}

impl CostFilter {
    /// A filter reading prices from `prices`.
    pub fn new(prices: std::sync::Arc<dyn PriceSource>) -> Self {
        CostFilter { prices }
    }
}

impl crate::chain::ResponseFilter for CostFilter {
    fn name(&self) -> &'static str {
        "cost"
    }

    fn on_end(&self, ctx: &mut crate::context::RequestCtx) {
        if !ctx.route.billed {
            return;
        }
        let rate = ctx.auth.as_ref().map_or(10_000, |a| a.key.price_rate);
        let table = self.prices.table();
        // The model the upstream says it ran, else the one sent to it, else the one asked for
        // (an account may map a priced name to a deployment name of its own), whichever has a
        // price; without one, the record names the model as unpriced.
        let model = [
            &ctx.usage.upstream_model,
            &ctx.upstream.model,
            &ctx.request.model,
        ]
        .into_iter()
        .filter_map(Option::as_deref)
        .find(|m| table.get_at(m, ctx.started_ms).is_some())
        .or(ctx.upstream.model.as_deref())
        .or(ctx.usage.upstream_model.as_deref());
        let cost = compute_cost_with_subs(
            &table,
            model,
            &ctx.usage.tokens,
            ctx.usage.service_tier.unwrap_or_default(),
            &ctx.usage.sub_usage,
            ctx.started_ms,
            rate,
        );
        ctx.usage.base_cost = cost.base;
        ctx.usage.billed_cost = cost.billed;
        ctx.usage.unpriced = cost.unpriced;
        // Priced apart, counted together: the record's tokens are all its model's passes
        // (an advisor's are in its cost only).
        for pass in ctx.usage.sub_usage.iter().filter(|p| p.model.is_none()) {
            ctx.usage.tokens = ctx.usage.tokens.plus(&pass.tokens);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing unwrap is a failing test
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../../conf/pricing.toml");

    fn price(input: i64, output: i64) -> ModelPrice {
        ModelPrice {
            input,
            output,
            cache_write_5m: None,
            cache_write_1h: None,
            cache_read: None,
            web_search: None,
            web_search_request: None,
            long_context: None,
            priority: None,
            flex: None,
            fast: None,
        }
    }

    fn table(entries: &[(&str, ModelPrice)]) -> PriceTable {
        let mut t = PriceTable::new();
        for (name, p) in entries {
            t.insert(name, *p);
        }
        t
    }

    #[test]
    fn the_filter_prices_the_first_model_with_a_price() {
        use crate::chain::ResponseFilter as _;
        struct Fixed(std::sync::Arc<PriceTable>);
        impl PriceSource for Fixed {
            fn table(&self) -> std::sync::Arc<PriceTable> {
                self.0.clone()
            }
        }
        let mut prices = table(&[("gpt-5", price(1_250_000, 10_000_000))]);
        // A model whose price doubles from 2027 on.
        let scheduled = PriceTable::from_toml_str(
            "[models.s]\ninput = 1000000\noutput = 10000000\n\
             [models.s.from.2027-01-01]\ninput = 2000000\noutput = 20000000\n",
        )
        .unwrap();
        prices.insert_schedule("s", scheduled.schedule("s").unwrap().clone());
        let filter = CostFilter::new(std::sync::Arc::new(Fixed(std::sync::Arc::new(prices))));
        let route = crate::route::ApiRoute {
            protocol: crate::Protocol::OpenaiResponses,
            upstream_path: "/responses".into(),
            path_model: None,
            path_stream: false,
            billed: true,
        };
        let run = |requested: &str, sent: &str, reported: &str| {
            let mut ctx = crate::context::RequestCtx::new("r".into(), route.clone(), 0);
            ctx.request.model = Some(requested.into());
            ctx.upstream.model = Some(sent.into());
            ctx.usage.upstream_model = Some(reported.into());
            ctx.usage.tokens = tokens(1000, 100, 0, 0, 0);
            filter.on_end(&mut ctx);
            (ctx.usage.billed_cost, ctx.usage.unpriced)
        };
        // An account mapped the priced name to a deployment of its own, which reports that
        // name: billed at the name asked for, not free.
        assert_eq!(
            run("gpt-5", "my-deployment", "my-deployment"),
            (2_250, false)
        );
        // The upstream's own priced name comes first.
        assert_eq!(run("house", "house", "gpt-5"), (2_250, false));
        // Nothing priced: nothing billed, and the record says why.
        assert_eq!(run("house", "house", "house-2025"), (0, true));
        // At the prices in effect when the request arrived, however late it ends.
        let arrived = |started_ms| {
            let mut ctx = crate::context::RequestCtx::new("r".into(), route.clone(), started_ms);
            ctx.request.model = Some("s".into());
            ctx.usage.tokens = tokens(1000, 100, 0, 0, 0);
            filter.on_end(&mut ctx);
            ctx.usage.billed_cost
        };
        assert_eq!(arrived(NEW_YEAR_2027 - 1), 2_000);
        assert_eq!(arrived(NEW_YEAR_2027), 4_000);
    }

    fn tokens(input: u64, output: u64, w5m: u64, w1h: u64, read: u64) -> TokenUsage {
        TokenUsage {
            input_tokens: input,
            output_tokens: output,
            cache_write_5m_tokens: w5m,
            cache_write_1h_tokens: w1h,
            cache_read_tokens: read,
            reasoning_tokens: 0,
            web_search_requests: 0,
        }
    }

    fn priced(base: i64, billed: i64) -> Cost {
        Cost {
            base,
            billed,
            unpriced: false,
        }
    }

    #[test]
    fn estimates_price_the_body_and_the_output_cap() {
        let t = table(&[("claude-sonnet-4-5", price(3_000_000, 15_000_000))]);
        let sonnet = Some("claude-sonnet-4-5");
        // 40 000 bytes = 10 000 input tokens (30 000) + 1 000 output tokens (15 000).
        assert_eq!(
            estimate_cost(&t, sonnet, 40_000, Some(1000), 10_000),
            45_000
        );
        // No cap: 4096 output tokens (61 440); a 0.5× user rate halves it.
        assert_eq!(estimate_cost(&t, sonnet, 0, None, 10_000), 61_440);
        assert_eq!(estimate_cost(&t, sonnet, 0, None, 5_000), 30_720);
        // Dated ids take their undated price; an unknown model holds nothing.
        assert_eq!(
            estimate_cost(&t, Some("claude-sonnet-4-5-20250929"), 0, Some(1), 10_000),
            15
        );
        assert_eq!(estimate_cost(&t, Some("other"), 40_000, None, 10_000), 0);
        assert_eq!(estimate_cost(&t, None, 40_000, None, 10_000), 0);
        // Absurd caps saturate instead of wrapping.
        assert!(estimate_cost(&t, sonnet, usize::MAX, Some(u64::MAX), i64::MAX) > 0);
        assert_eq!(estimate_input_tokens(40_000), 10_000);
    }

    #[test]
    fn cost_examples_computed_by_hand() {
        let sonnet = ModelPrice {
            input: 3_000_000,
            output: 15_000_000,
            cache_write_5m: Some(3_750_000),
            cache_write_1h: Some(6_000_000),
            cache_read: Some(300_000),
            web_search: None,
            web_search_request: None,
            long_context: None,
            priority: None,
            flex: None,
            fast: None,
        };
        let t = table(&[
            ("claude-sonnet-4-5", sonnet),
            // Only input/output: cache prices default to 1.25x, 2x and 0.1x input.
            ("plain", price(3_000_000, 15_000_000)),
            ("half", price(500_000, 500_000)),
            ("tiny", price(400_000, 400_000)),
            ("odd", price(1_500_000, 1_499_999)),
        ]);
        let cases: &[(&str, &str, TokenUsage, i64, Cost)] = &[
            // 1000 × $3 + 500 × $15 per MTok = $0.0105 = 10 500 µUSD.
            (
                "input and output",
                "claude-sonnet-4-5",
                tokens(1000, 500, 0, 0, 0),
                10_000,
                priced(10_500, 10_500),
            ),
            // The fixture of anthropic.stream.sse: 12×3 + 187×15 + 1536×3.75 + 20480×0.3 = 14 745 µUSD.
            (
                "all categories",
                "claude-sonnet-4-5",
                tokens(12, 187, 1536, 0, 20480),
                10_000,
                priced(14_745, 14_745),
            ),
            // 1000 × 3.75 + 1000 × 6 + 10 000 × 0.3 = 12 750 µUSD, from the defaults.
            (
                "cache defaults",
                "plain",
                tokens(0, 0, 1000, 1000, 10_000),
                10_000,
                priced(12_750, 12_750),
            ),
            (
                "explicit cache prices",
                "claude-sonnet-4-5",
                tokens(0, 0, 1000, 1000, 10_000),
                10_000,
                priced(12_750, 12_750),
            ),
            // 10 500 × 1.5 = 15 750.
            (
                "rate 1.5x",
                "claude-sonnet-4-5",
                tokens(1000, 500, 0, 0, 0),
                15_000,
                priced(10_500, 15_750),
            ),
            (
                "rate 0.8x",
                "claude-sonnet-4-5",
                tokens(1000, 500, 0, 0, 0),
                8_000,
                priced(10_500, 8_400),
            ),
            (
                "rate 0",
                "claude-sonnet-4-5",
                tokens(1000, 500, 0, 0, 0),
                0,
                priced(10_500, 0),
            ),
            // 1 token × $1.5 = 1.5 µUSD → 2 (half up); 3 tokens → 4.5 → 5.
            (
                "half up",
                "odd",
                tokens(1, 0, 0, 0, 0),
                10_000,
                priced(2, 2),
            ),
            (
                "half up odd",
                "odd",
                tokens(3, 0, 0, 0, 0),
                10_000,
                priced(5, 5),
            ),
            // 1.499999 µUSD → 1.
            (
                "just below half",
                "odd",
                tokens(0, 1, 0, 0, 0),
                10_000,
                priced(1, 1),
            ),
            // Rounded once from the sum: 0.5 + 0.5 = 1, not round(0.5) + round(0.5) = 2.
            (
                "no per-category rounding up",
                "half",
                tokens(1, 1, 0, 0, 0),
                10_000,
                priced(1, 1),
            ),
            // 0.4 + 0.4 = 0.8 → 1, not 0 + 0.
            (
                "no per-category rounding down",
                "tiny",
                tokens(1, 1, 0, 0, 0),
                10_000,
                priced(1, 1),
            ),
            // base 3 × 1.5 = 4.5 → 5; base 1 × 1.5 = 1.5 → 2; base 1 × 1.25 = 1.25 → 1.
            (
                "billed half up",
                "odd",
                tokens(2, 0, 0, 0, 0),
                15_000,
                priced(3, 5),
            ),
            (
                "billed half up small",
                "odd",
                tokens(1, 0, 0, 0, 0),
                7_500,
                priced(2, 2),
            ),
            (
                "billed below half",
                "half",
                tokens(1, 1, 0, 0, 0),
                12_500,
                priced(1, 1),
            ),
            // Reasoning is inside output and not billed again.
            (
                "reasoning not billed twice",
                "plain",
                TokenUsage {
                    reasoning_tokens: 999,
                    ..tokens(0, 1000, 0, 0, 0)
                },
                10_000,
                priced(15_000, 15_000),
            ),
        ];
        for (name, model, usage, rate, expected) in cases {
            assert_eq!(
                compute_cost(&t, Some(model), usage, *rate),
                *expected,
                "{name}"
            );
        }
    }

    /// Web searches are priced per search, on top of the tokens and within the one rounding;
    /// without a `web_search` price they cost nothing.
    #[test]
    fn web_searches_are_priced_per_search() {
        let searching = ModelPrice {
            web_search: Some(10_000),
            ..price(3_000_000, 15_000_000)
        };
        let t = table(&[
            ("claude-sonnet-4-5", searching),
            ("gpt-5", price(1_250_000, 10_000_000)),
            (
                "cheap",
                ModelPrice {
                    web_search: Some(3),
                    ..price(500_000, 1)
                },
            ),
            (
                "gemini-2.5-pro",
                ModelPrice {
                    web_search_request: Some(35_000),
                    ..price(1_250_000, 10_000_000)
                },
            ),
        ]);
        // Billed per request that searched ($35 per 1 000 grounded prompts), however many
        // searches it ran: 1 000 × $1.25 + 100 × $10 = 2 250, + 35 000.
        for n in [1, 4] {
            assert_eq!(
                compute_cost(
                    &t,
                    Some("gemini-2.5-pro"),
                    &TokenUsage {
                        web_search_requests: n,
                        ..tokens(1000, 100, 0, 0, 0)
                    },
                    10_000
                ),
                priced(37_250, 37_250),
                "{n} searches"
            );
        }
        assert_eq!(
            compute_cost(
                &t,
                Some("gemini-2.5-pro"),
                &tokens(1000, 100, 0, 0, 0),
                10_000
            ),
            priced(2_250, 2_250),
            "no search, no grounding fee"
        );
        let with_searches = |n, usage: TokenUsage| TokenUsage {
            web_search_requests: n,
            ..usage
        };
        // 1000 × $3 + 500 × $15 per MTok = 10 500 µUSD, + 3 searches × $0.01 = 30 000 µUSD.
        assert_eq!(
            compute_cost(
                &t,
                Some("claude-sonnet-4-5-20250929"),
                &with_searches(3, tokens(1000, 500, 0, 0, 0)),
                10_000
            ),
            priced(40_500, 40_500)
        );
        // Searches alone are priced too, and the user's rate applies to them.
        assert_eq!(
            compute_cost(
                &t,
                Some("claude-sonnet-4-5"),
                &with_searches(1, TokenUsage::default()),
                15_000
            ),
            priced(10_000, 15_000)
        );
        // No search price: only the tokens are billed, and the model is not unpriced.
        assert_eq!(
            compute_cost(
                &t,
                Some("gpt-5"),
                &with_searches(4, tokens(1000, 100, 0, 0, 0)),
                10_000
            ),
            priced(2_250, 2_250)
        );
        // One rounding for the whole request: 0.5 µUSD of tokens + 2 × 3 µUSD = 6.5 → 7.
        assert_eq!(
            compute_cost(
                &t,
                Some("cheap"),
                &with_searches(2, tokens(1, 0, 0, 0, 0)),
                10_000
            ),
            priced(7, 7)
        );
        // An unknown model with searches is unpriced, as with tokens.
        assert!(
            compute_cost(
                &t,
                Some("gpt-9"),
                &with_searches(1, TokenUsage::default()),
                10_000
            )
            .unpriced
        );
        // Absurd counts saturate.
        let huge = ModelPrice {
            web_search: Some(i64::MAX),
            ..price(0, 0)
        };
        let t = table(&[("m", huge)]);
        let cost = compute_cost(
            &t,
            Some("m"),
            &with_searches(u64::MAX, TokenUsage::default()),
            10_000,
        );
        assert_eq!(cost.base, i64::MAX);
    }

    #[test]
    fn default_cache_prices_round_half_up() {
        let p = price(3_000_000, 0);
        assert_eq!(p.rates(0, ServiceTier::Standard).cache_write_5m, 3_750_000);
        assert_eq!(p.rates(0, ServiceTier::Standard).cache_write_1h, 6_000_000);
        assert_eq!(p.rates(0, ServiceTier::Standard).cache_read, 300_000);
        let p = price(3, 0);
        assert_eq!(p.rates(0, ServiceTier::Standard).cache_write_5m, 4); // 3.75
        assert_eq!(p.rates(0, ServiceTier::Standard).cache_read, 0); // 0.3
        let p = price(5, 0);
        assert_eq!(p.rates(0, ServiceTier::Standard).cache_read, 1); // 0.5
        assert_eq!(p.rates(0, ServiceTier::Standard).cache_write_5m, 6); // 6.25
        let explicit = ModelPrice {
            cache_write_5m: Some(1),
            cache_write_1h: Some(2),
            cache_read: Some(3),
            ..price(100, 0)
        };
        assert_eq!(
            (
                explicit.rates(0, ServiceTier::Standard).cache_write_5m,
                explicit.rates(0, ServiceTier::Standard).cache_write_1h,
                explicit.rates(0, ServiceTier::Standard).cache_read
            ),
            (1, 2, 3)
        );
    }

    #[test]
    fn unknown_or_missing_model_is_unpriced() {
        let t = table(&[("gpt-4o", price(2_500_000, 10_000_000))]);
        let used = tokens(100, 100, 0, 0, 0);
        let unpriced = Cost {
            base: 0,
            billed: 0,
            unpriced: true,
        };
        assert_eq!(compute_cost(&t, Some("gpt-9"), &used, 10_000), unpriced);
        assert_eq!(compute_cost(&t, None, &used, 10_000), unpriced);
        // Nothing used: nothing to price, not flagged.
        assert_eq!(
            compute_cost(&t, Some("gpt-9"), &TokenUsage::default(), 10_000),
            Cost::default()
        );
        assert_eq!(
            compute_cost(&t, Some("gpt-4o"), &TokenUsage::default(), 10_000),
            Cost::default()
        );
    }

    #[test]
    fn dated_ids_fall_back_but_never_to_another_model() {
        let t = table(&[
            ("claude-sonnet-4-5", price(3, 3)),
            ("claude-opus-4", price(15, 15)),
            ("gpt-4o", price(25, 25)),
            ("gpt-4o-mini", price(1, 1)),
            ("gpt-5", price(12, 12)),
            ("exact-20250101", price(7, 7)),
            ("exact", price(8, 8)),
        ]);
        let cases: &[(&str, Option<i64>)] = &[
            ("claude-sonnet-4-5", Some(3)),
            ("claude-sonnet-4-5-20250929", Some(3)),
            ("claude-opus-4-20250514", Some(15)),
            ("gpt-4o-2024-08-06", Some(25)),
            ("gpt-4o-mini-2024-07-18", Some(1)),
            ("gpt-5-2025-08-07", Some(12)),
            ("exact-20250101", Some(7)),
            ("exact-20250102", Some(8)),
            // Different models, even when one name starts with the other.
            ("claude-opus-4-1", None),
            ("claude-opus-4-1-20250805", None),
            ("claude-opus-4-5-20251101", None),
            ("claude-sonnet-4", None),
            ("claude-sonnet-4-5-thinking", None),
            ("gpt-4o-audio-preview", None),
            ("gpt-4", None),
            ("gpt-5.1", None),
            // Only a real trailing date is stripped.
            ("gpt-5-2025", None),
            ("gpt-4o-2024-13-01", None),
            ("claude-sonnet-4-5-20251399", None),
            ("claude-sonnet-4-5-2025092", None),
            ("claude-sonnet-4-5-20250929-20250929", None),
            ("-20250929", None),
            ("", None),
        ];
        for (model, expected) in cases {
            assert_eq!(t.get(model).map(|p| p.input), *expected, "{model}");
        }
        let t = table(&[("claude-opus-4-1", price(15, 15))]);
        assert_eq!(t.get("claude-opus-4"), None);
        assert_eq!(t.get("claude-opus-4-20250514"), None);
    }

    #[test]
    fn inserted_prices_override_the_file() {
        let mut t = PriceTable::from_toml_str(SHIPPED).unwrap();
        let custom = price(1, 2);
        t.insert("claude-sonnet-4-5", custom);
        t.insert("my-finetune", custom);
        assert_eq!(t.get("claude-sonnet-4-5-20250929"), Some(&custom));
        assert_eq!(t.get("my-finetune"), Some(&custom));
    }

    #[test]
    fn shipped_price_list_parses_with_known_prices() {
        let t = PriceTable::from_toml_str(SHIPPED).unwrap();
        assert!(t.len() >= 40);
        let sonnet = t.get("claude-sonnet-4-5-20250929").unwrap();
        assert_eq!(
            *sonnet,
            ModelPrice {
                input: 3_000_000,
                output: 15_000_000,
                cache_write_5m: Some(3_750_000),
                cache_write_1h: Some(6_000_000),
                cache_read: Some(300_000),
                web_search: Some(10_000),
                web_search_request: None,
                long_context: None,
                priority: None,
                flex: None,
                fast: None,
            }
        );
        assert_eq!(
            t.get("claude-opus-4-1-20250805").unwrap().output,
            75_000_000
        );
        assert_eq!(t.get("claude-opus-4-5").unwrap().input, 5_000_000);
        assert_eq!(
            t.get("claude-haiku-4-5-20251001").unwrap().cache_write_1h,
            Some(2_000_000)
        );
        assert_eq!(
            t.get("gpt-4o-mini-2024-07-18").unwrap().cache_read,
            Some(75_000)
        );
        assert_eq!(t.get("gpt-5").unwrap().input, 1_250_000);
        // A snapshot priced apart from its undated name is found as itself.
        assert_eq!(t.get("gpt-4o-2024-05-13").unwrap().input, 5_000_000);
        assert_eq!(t.get("gpt-4o-2024-08-06").unwrap().input, 2_500_000);
        assert_eq!(t.get("gemini-2.5-flash").unwrap().output, 2_500_000);
        // Introductory prices that end on a date the list names.
        for model in ["gemini-3.7-flash", "gemini-3.8-flash"] {
            let before = t.get_at(model, NEW_YEAR_2027 - 1).unwrap();
            let after = t.get_at(model, NEW_YEAR_2027).unwrap();
            assert_eq!(
                (before.input, before.output, before.cache_read),
                (750_000, 3_750_000, Some(75_000)),
                "{model}"
            );
            assert_eq!(
                (after.input, after.output, after.cache_read),
                (1_500_000, 7_500_000, Some(150_000)),
                "{model}"
            );
        }
        for model in [
            "claude-opus-4-1",
            "claude-opus-4",
            "claude-opus-4-5",
            "claude-sonnet-4-5",
            "claude-sonnet-4",
            "claude-3-7-sonnet",
            "claude-haiku-4-5",
            "claude-3-5-haiku",
            "gpt-5",
            "gpt-5-mini",
            "gpt-5-nano",
            "gpt-5-codex",
            "gpt-4.1",
            "gpt-4.1-mini",
            "gpt-4o",
            "gpt-4o-mini",
            "o3",
            "o4-mini",
            "gemini-2.5-pro",
            "gemini-2.5-flash",
            "gemini-2.5-flash-lite",
            "gemini-2.0-flash",
        ] {
            assert!(t.get(model).is_some(), "{model} has no price");
        }
        for (model, p) in t
            .schedules()
            .flat_map(|(m, s)| s.prices().map(move |p| (m, p)))
        {
            assert!(p.input > 0 && p.output > p.input, "{model}");
            assert!(
                p.rates(0, ServiceTier::Standard).cache_read < p.input,
                "{model}"
            );
            if model.starts_with("claude-") {
                assert!(
                    p.cache_write_5m.is_some()
                        && p.cache_write_1h.is_some()
                        && p.cache_read.is_some(),
                    "{model}"
                );
                // $10 per 1 000 searches wherever Anthropic offers the web search tool.
                let searches = (model != "claude-3-haiku").then_some(10_000);
                assert_eq!(p.web_search, searches, "{model}");
            } else if model.starts_with("gemini-") {
                // Gemini 3 per search query, 2.5 and 2.0 Flash per grounded prompt.
                let per_query =
                    model.starts_with("gemini-3-") || model.starts_with("gemini-3.1-pro");
                let per_prompt = model.starts_with("gemini-2.5") || model == "gemini-2.0-flash";
                assert_eq!(p.web_search, per_query.then_some(14_000), "{model}");
                assert_eq!(
                    p.web_search_request,
                    per_prompt.then_some(35_000),
                    "{model}"
                );
            } else {
                // OpenAI's per-call prices are left to the admins.
                assert_eq!(p.web_search, None, "{model}");
                // These two report no cached input.
                assert!(
                    p.cache_read.is_some()
                        || ["gemini-2.0-flash-lite", "gpt-4o-2024-05-13"].contains(&model),
                    "{model}"
                );
            }
        }
        // The models priced by prompt length, and where their long card starts.
        let tiers: Vec<(&str, u64)> = t
            .schedules()
            .map(|(m, s)| (m, s.prices().next().unwrap()))
            .filter_map(|(m, p)| Some((m, p.long_context?.above_tokens)))
            .collect();
        assert_eq!(
            tiers,
            [
                ("claude-haiku-5-5", 100_000),
                ("gemini-2.5-pro", 200_000),
                ("gemini-3-pro-preview", 200_000),
                ("gemini-3.1-pro-preview", 200_000),
                ("gpt-5.4", 272_000),
                ("gpt-5.5", 272_000),
                ("gpt-5.6", 272_000),
                ("gpt-5.6-luna", 272_000),
                ("gpt-5.6-sol", 272_000),
                ("gpt-5.6-terra", 272_000),
                ("gpt-6-astra", 272_000),
                ("gpt-6-luna", 272_000),
                ("gpt-6-sol", 272_000),
                ("gpt-6.1-sol", 272_000),
                ("gpt-6.1-terra", 272_000),
                ("gpt-6.2-astra", 272_000),
                ("gpt-6.2-sol", 272_000),
            ]
        );
        for (model, p) in t
            .schedules()
            .flat_map(|(m, s)| s.prices().map(move |p| (m, p)))
        {
            if let Some(long) = p.long_context {
                assert!(long.input > p.input && long.output > p.output, "{model}");
            }
        }
        // Service tiers: priority dearer and flex cheaper than standard, fast mode twice it.
        let mut tiers = (0, 0, 0);
        for (model, p) in t
            .schedules()
            .flat_map(|(m, s)| s.prices().map(move |p| (m, p)))
        {
            if let Some(c) = p.priority {
                assert!(c.input > p.input && c.output > p.output, "{model}");
                tiers.0 += 1;
            }
            if let Some(c) = p.flex {
                assert!(c.input < p.input && c.output < p.output, "{model}");
                tiers.1 += 1;
            }
            if let Some(c) = p.fast {
                assert!(model.starts_with("claude-"), "{model}");
                let (fast, standard) = (c.rates(), p.standard().rates());
                assert_eq!(
                    [
                        fast.input,
                        fast.output,
                        fast.cache_write_5m,
                        fast.cache_write_1h,
                        fast.cache_read
                    ],
                    [
                        standard.input,
                        standard.output,
                        standard.cache_write_5m,
                        standard.cache_write_1h,
                        standard.cache_read
                    ]
                    .map(|v| v * 2),
                    "{model}"
                );
                tiers.2 += 1;
            }
        }
        assert!(tiers.0 >= 20 && tiers.1 >= 10 && tiers.2 >= 3, "{tiers:?}");
        let gpt55 = t.get("gpt-5.5").unwrap().priority.unwrap();
        assert_eq!((gpt55.input, gpt55.output), (12_500_000, 75_000_000));
        // Haiku 5.5 over 100K: every field five times the first card's.
        let haiku = t.get("claude-haiku-5-5").unwrap();
        let (short, long) = (
            haiku.rates(100_000, ServiceTier::Standard),
            haiku.rates(100_001, ServiceTier::Standard),
        );
        assert_eq!(
            [
                long.input,
                long.output,
                long.cache_write_5m,
                long.cache_write_1h,
                long.cache_read
            ],
            [
                short.input,
                short.output,
                short.cache_write_5m,
                short.cache_write_1h,
                short.cache_read
            ]
            .map(|p| p * 5)
        );
        // gemini-2.5-pro, 250 000 prompt tokens of which 50 000 cached, 1 000 out:
        // 200 000 × 2.5 + 50 000 × 0.25 + 1 000 × 15 = 500 000 + 12 500 + 15 000.
        assert_eq!(
            compute_cost(
                &t,
                Some("gemini-2.5-pro"),
                &tokens(200_000, 1_000, 0, 0, 50_000),
                10_000
            ),
            priced(527_500, 527_500)
        );
        // The fixtures' costs, as the relay will book them.
        let cost = compute_cost(
            &t,
            Some("claude-sonnet-4-5-20250929"),
            &tokens(12, 187, 1536, 0, 20480),
            10_000,
        );
        assert_eq!(cost, priced(14_745, 14_745));
        // gpt-5-mini: 307 × 0.25 + 352 × 2 + 1536 × 0.025 = 76.75 + 704 + 38.4 = 819.15 → 819.
        let cost = compute_cost(
            &t,
            Some("gpt-5-mini-2025-08-07"),
            &tokens(307, 352, 0, 0, 1536),
            15_000,
        );
        assert_eq!(cost, priced(819, 1_229));
    }

    /// Midnight UTC of 2027-01-01 in epoch ms.
    const NEW_YEAR_2027: i64 = 1_798_761_600_000;

    #[test]
    fn change_dates_read_as_utc() {
        assert_eq!(parse_from("1970-01-01"), Some(0));
        assert_eq!(parse_from("2027-01-01"), Some(NEW_YEAR_2027));
        assert_eq!(
            parse_from("2026-12-31T23:59:59Z"),
            Some(NEW_YEAR_2027 - 1_000)
        );
        // 2028 is a leap year, 2100 is not, 2000 was.
        assert_eq!(
            parse_from("2028-03-01").unwrap() - parse_from("2028-02-28").unwrap(),
            2 * 86_400_000
        );
        assert_eq!(parse_from("2000-02-29"), Some(951_782_400_000));
        for bad in [
            "2100-02-29",
            "2027-02-29",
            "2027-13-01",
            "2027-00-10",
            "2027-04-31",
            "2027-1-01",
            "27-01-01",
            "1969-12-31",
            "2027-01-01T24:00:00Z",
            "2027-01-01T08:00:00",
            "2027-01-01T08:00:00+01:00",
            "2027-01-01 08:00:00Z",
            "2027-01-0a",
            "",
        ] {
            assert_eq!(parse_from(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_price_change_applies_from_its_date() {
        let t = PriceTable::from_toml_str(
            "[models.m]\ninput = 1000000\noutput = 2000000\nweb_search = 10000\n\
             [models.m.priority]\ninput = 3000000\noutput = 4000000\n\
             [models.m.from.\"2027-01-01\"]\ninput = 5000000\noutput = 6000000\n\
             [models.m.from.2027-01-01.priority]\ninput = 7000000\noutput = 8000000\n\
             [models.m.from.\"2027-03-01T12:00:00Z\"]\ninput = 9000000\noutput = 10000000\n\
             [models.n]\ninput = 1\noutput = 2\n",
        )
        .unwrap();
        let march = parse_from("2027-03-01T12:00:00Z").unwrap();
        let usage = tokens(1_000_000, 1_000_000, 0, 0, 0);
        let cost = |at, tier| compute_cost_at(&t, Some("m"), &usage, tier, at, 10_000).base;
        // Before the first change: the first prices, the last millisecond included.
        assert_eq!(cost(0, ServiceTier::Standard), 3_000_000);
        assert_eq!(cost(NEW_YEAR_2027 - 1, ServiceTier::Standard), 3_000_000);
        assert_eq!(cost(NEW_YEAR_2027 - 1, ServiceTier::Priority), 7_000_000);
        // From the date on, the change's prices, its own cards with them.
        assert_eq!(cost(NEW_YEAR_2027, ServiceTier::Standard), 11_000_000);
        assert_eq!(cost(NEW_YEAR_2027, ServiceTier::Priority), 15_000_000);
        // A change is the whole price: the later one has no priority card and no search
        // price, so neither carries over.
        assert_eq!(cost(march, ServiceTier::Standard), 19_000_000);
        assert_eq!(cost(march, ServiceTier::Priority), 19_000_000);
        let searched = TokenUsage {
            web_search_requests: 1,
            ..TokenUsage::default()
        };
        let search =
            |at| compute_cost_at(&t, Some("m"), &searched, ServiceTier::Standard, at, 10_000);
        assert_eq!(search(NEW_YEAR_2027).base, 0);
        assert_eq!(search(0).base, 10_000);
        // A dated id finds the schedule; estimates and passes take the request's time too.
        assert_eq!(
            t.get_at("m-20270105", NEW_YEAR_2027).unwrap().input,
            5_000_000
        );
        assert_eq!(
            estimate_cost_at(
                &t,
                Some("m"),
                4_000_000,
                Some(0),
                ServiceTier::Standard,
                march,
                10_000
            ),
            9_000_000
        );
        let pass = SubUsage {
            model: Some("m".into()),
            tokens: tokens(1_000_000, 0, 0, 0, 0),
        };
        let with_pass = |at| {
            compute_cost_with_subs(
                &t,
                Some("n"),
                &TokenUsage::default(),
                ServiceTier::Standard,
                std::slice::from_ref(&pass),
                at,
                10_000,
            )
            .base
        };
        assert_eq!((with_pass(0), with_pass(march)), (1_000_000, 9_000_000));
        // The schedule's view: what comes after a time.
        let schedule = t.schedule("m").unwrap();
        assert_eq!(schedule.upcoming(0).len(), 2);
        assert_eq!(schedule.upcoming(NEW_YEAR_2027).len(), 1);
        assert_eq!(schedule.upcoming(march).len(), 0);
        assert_eq!(schedule.prices().count(), 3);
        assert!(t.schedule("n").unwrap().upcoming(0).is_empty());
        // An override laid over each period keeps the dates (as the price cache lays one).
        let laid_over = |f: &dyn Fn(&ModelPrice) -> ModelPrice| {
            PriceSchedule::with_changes(
                schedule.at(i64::MIN).map(f),
                schedule.upcoming(i64::MIN).iter().map(|c| PriceChange {
                    from_ms: c.from_ms,
                    price: f(&c.price),
                }),
            )
        };
        let doubled = laid_over(&|p| ModelPrice {
            input: p.input * 2,
            ..*p
        });
        assert_eq!(doubled.at(march).unwrap().input, 18_000_000);
        assert_eq!(doubled.upcoming(0)[0].from_ms, NEW_YEAR_2027);
        // A model priced only from a date is unpriced before it.
        let mut later = PriceTable::new();
        later.insert_schedule(
            "later",
            PriceSchedule::with_changes(
                None,
                [PriceChange {
                    from_ms: NEW_YEAR_2027,
                    price: price(1_000_000, 1_000_000),
                }],
            ),
        );
        let cost = |at| {
            compute_cost_at(
                &later,
                Some("later"),
                &usage,
                ServiceTier::Standard,
                at,
                10_000,
            )
        };
        assert!(cost(NEW_YEAR_2027 - 1).unpriced);
        assert_eq!(cost(NEW_YEAR_2027).base, 2_000_000);
        assert!(later.contains("later") && later.get_at("later", 0).is_none());
        // One that sets every price alike changes nothing on any date.
        let flat = laid_over(&|_| ModelPrice::default());
        assert!(flat.upcoming(0).is_empty());
        assert_eq!(flat.prices().count(), 1);
    }

    #[test]
    fn price_changes_must_follow_their_model_in_date_order() {
        let cases: &[(&str, &str, usize)] = &[
            (
                "change before the model",
                "[models.m.from.\"2027-01-01\"]\ninput = 1\noutput = 2\n",
                1,
            ),
            (
                "change after another model",
                "[models.m]\ninput = 1\noutput = 2\n[models.n]\ninput = 1\noutput = 2\n\
                 [models.m.from.\"2027-01-01\"]\ninput = 1\noutput = 2\n",
                7,
            ),
            (
                "dates out of order",
                "[models.m]\ninput = 1\noutput = 2\n[models.m.from.\"2027-02-01\"]\n\
                 input = 1\noutput = 2\n[models.m.from.\"2027-01-01\"]\ninput = 1\noutput = 2\n",
                7,
            ),
            (
                "the same date twice",
                "[models.m]\ninput = 1\noutput = 2\n[models.m.from.\"2027-02-01\"]\n\
                 input = 1\noutput = 2\n[models.m.from.\"2027-02-01\"]\ninput = 1\noutput = 2\n",
                7,
            ),
            (
                "card of a change not open",
                "[models.m]\ninput = 1\noutput = 2\n\
                 [models.m.from.\"2027-01-01\".priority]\ninput = 1\noutput = 2\n",
                4,
            ),
            (
                "card of the first price after a change",
                "[models.m]\ninput = 1\noutput = 2\n[models.m.from.\"2027-01-01\"]\n\
                 input = 1\noutput = 2\n[models.m.priority]\ninput = 1\noutput = 2\n",
                7,
            ),
            (
                "not a date",
                "[models.m]\ninput = 1\noutput = 2\n[models.m.from.\"next year\"]\n",
                4,
            ),
            (
                "no date",
                "[models.m]\ninput = 1\noutput = 2\n[models.m.from]\n",
                4,
            ),
            (
                "a change's card spelling its time otherwise",
                "[models.m]\ninput = 1\noutput = 2\n[models.m.from.\"2027-01-01T00:00:00Z\"]\n\
                 input = 1\noutput = 2\n[models.m.from.\"2027-01-01\".priority]\n",
                7,
            ),
            (
                "a time in a bare key",
                "[models.m]\ninput = 1\noutput = 2\n[models.m.from.2027-02-01T10:00:00Z]\n",
                4,
            ),
            (
                "impossible date",
                "[models.m]\ninput = 1\noutput = 2\n[models.m.from.\"2027-02-30\"]\n",
                4,
            ),
        ];
        for (name, text, line) in cases {
            match PriceTable::from_toml_str(text) {
                Err(PriceError::Syntax { line: got, .. }) => assert_eq!(got, *line, "{name}"),
                other => panic!("{name}: {other:?}"),
            }
        }
        // Every TOML spelling of the key: bare, double- or single-quoted.
        let spelled = PriceTable::from_toml_str(
            "[models.m]\ninput = 1\noutput = 2\n[models.m.from.'2027-01-01']\ninput = 3\n\
             output = 4\n[models.m.from.'2027-01-01'.flex]\ninput = 1\noutput = 2\n",
        )
        .unwrap();
        assert_eq!(
            spelled
                .get_at("m", NEW_YEAR_2027)
                .unwrap()
                .flex
                .map(|f| f.input),
            Some(1)
        );
        // A change lacking a required price names its date.
        assert_eq!(
            PriceTable::from_toml_str(
                "[models.m]\ninput = 1\noutput = 2\n[models.m.from.\"2027-01-01\"]\ninput = 1\n"
            ),
            Err(PriceError::MissingField {
                model: "m from 2027-01-01".into(),
                field: "output"
            })
        );
        // The model's first table again, after its changes, is a duplicate.
        assert_eq!(
            PriceTable::from_toml_str(
                "[models.m]\ninput = 1\noutput = 2\n[models.m.from.\"2027-01-01\"]\n\
                 input = 1\noutput = 2\n[models.m]\ninput = 1\noutput = 2\n"
            ),
            Err(PriceError::DuplicateModel { model: "m".into() })
        );
    }

    #[test]
    fn price_list_format_errors_name_the_line() {
        let ok = "[models.\"m\"]\ninput = 1\noutput = 2\n";
        assert!(PriceTable::from_toml_str(ok).is_ok());
        let syntax_cases: &[(&str, &str, usize)] = &[
            (
                "unknown key",
                "[models.\"m\"]\ninput = 1\noutput = 2\ncache_write = 3\n",
                4,
            ),
            ("key outside table", "input = 1\n", 1),
            ("negative", "[models.m]\ninput = -1\noutput = 2\n", 2),
            ("float", "[models.m]\ninput = 1.5\noutput = 2\n", 2),
            ("string", "[models.m]\ninput = \"1\"\noutput = 2\n", 2),
            ("empty value", "[models.m]\ninput =\noutput = 2\n", 2),
            ("leading zero", "[models.m]\ninput = 01\noutput = 2\n", 2),
            (
                "bad underscore",
                "[models.m]\ninput = 1__0\noutput = 2\n",
                2,
            ),
            (
                "overflow",
                "[models.m]\ninput = 99999999999999999999\noutput = 2\n",
                2,
            ),
            (
                "set twice",
                "[models.m]\ninput = 1\ninput = 2\noutput = 2\n",
                3,
            ),
            (
                "negative search price",
                "[models.m]\ninput = 1\noutput = 2\nweb_search = -1\n",
                4,
            ),
            ("not models", "[prices.m]\ninput = 1\noutput = 2\n", 1),
            ("array of tables", "[[models]]\n", 1),
            ("unclosed header", "[models.\"m\"\n", 1),
            ("unclosed quote", "[models.\"m]\n", 1),
            ("junk after name", "[models.\"m\" x]\n", 1),
            (
                "dotted bare name",
                "[models.gpt-4.1]\ninput = 1\noutput = 2\n",
                1,
            ),
            (
                "escape",
                "[models.\"a\\u0041\"]\ninput = 1\noutput = 2\n",
                1,
            ),
            ("empty name", "[models.\"\"]\ninput = 1\noutput = 2\n", 1),
            ("garbage", "[models.m]\nhello\n", 2),
        ];
        for (name, text, line) in syntax_cases {
            match PriceTable::from_toml_str(text) {
                Err(PriceError::Syntax { line: got, .. }) => assert_eq!(got, *line, "{name}"),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert_eq!(
            PriceTable::from_toml_str("[models.m]\ninput = 1\n"),
            Err(PriceError::MissingField {
                model: "m".into(),
                field: "output"
            })
        );
        assert_eq!(
            PriceTable::from_toml_str(
                "[models.m]\noutput = 1\n[models.n]\ninput = 1\noutput = 1\n"
            ),
            Err(PriceError::MissingField {
                model: "m".into(),
                field: "input"
            })
        );
        assert_eq!(
            PriceTable::from_toml_str("[models.m]\ninput = 1\noutput = 1\n[models.\"m\"]\n"),
            Err(PriceError::DuplicateModel { model: "m".into() })
        );
    }

    #[test]
    fn price_list_accepts_toml_spellings() {
        let text = "# header\n\n[ models . 'single-quoted' ]  # trailing comment\ninput = +3_000_000 # $3\noutput=15000000\n\n[models.bare_name-1]\ninput = 0\noutput = 1\n[models.\"with # hash\"]\ninput = 1\noutput = 2\n";
        let t = PriceTable::from_toml_str(text).unwrap();
        assert_eq!(t.get("single-quoted").unwrap().input, 3_000_000);
        assert_eq!(t.get("single-quoted").unwrap().output, 15_000_000);
        assert_eq!(t.get("bare_name-1").unwrap().input, 0);
        assert_eq!(t.get("with # hash").unwrap().output, 2);
        assert_eq!(t.get("with # hash").unwrap().web_search, None);
        let searching =
            PriceTable::from_toml_str("[models.s]\ninput = 1\noutput = 2\nweb_search = 10_000\n")
                .unwrap();
        assert_eq!(searching.get("s").unwrap().web_search, Some(10_000));
        assert_eq!(
            t.schedules().map(|(m, _)| m).collect::<Vec<_>>(),
            ["bare_name-1", "single-quoted", "with # hash"]
        );
        assert!(PriceTable::from_toml_str("").unwrap().is_empty());
    }

    #[test]
    fn model_price_serde_matches_the_file_format() {
        let p: ModelPrice =
            serde_json::from_str(r#"{"input":1,"output":2,"cache_read":3}"#).unwrap();
        assert_eq!(
            p,
            ModelPrice {
                cache_read: Some(3),
                ..price(1, 2)
            }
        );
        assert!(serde_json::from_str::<ModelPrice>(r#"{"input":1,"output":2,"cache":3}"#).is_err());
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"input":1,"output":2,"cache_read":3}"#
        );
        let p: ModelPrice =
            serde_json::from_str(r#"{"input":1,"output":2,"web_search":10000}"#).unwrap();
        assert_eq!(p.web_search, Some(10_000));
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"input":1,"output":2,"web_search":10000}"#
        );
    }

    /// A card like Claude Haiku 5.5's: $0.10 / $0.50 up to 100 000 prompt tokens, five times
    /// that above.
    fn tiered() -> ModelPrice {
        ModelPrice {
            cache_read: Some(10_000),
            web_search: Some(10_000),
            long_context: Some(LongContextPrice {
                above_tokens: 100_000,
                input: 500_000,
                output: 2_500_000,
                cache_write_5m: None,
                cache_write_1h: Some(1_000_000),
                cache_read: Some(50_000),
                ..LongContextPrice::default()
            }),
            ..price(100_000, 500_000)
        }
    }

    #[test]
    fn long_prompts_take_the_long_context_card() {
        let t = table(&[("haiku", tiered())]);
        let cost = |usage: TokenUsage| compute_cost(&t, Some("haiku"), &usage, 10_000);
        // 100 000 prompt tokens: the standard card. 100 000 × 0.1 + 1 000 × 0.5 = 10 500.
        assert_eq!(
            cost(tokens(100_000, 1_000, 0, 0, 0)),
            priced(10_500, 10_500)
        );
        // One more: every token at the long card, output too. 100 001 × 0.5 + 1 000 × 2.5
        // = 50 000.5 + 2 500 → 52 501 (half up).
        assert_eq!(
            cost(tokens(100_001, 1_000, 0, 0, 0)),
            priced(52_501, 52_501)
        );
        // Cache reads and writes count toward the prompt's length: 1 000 uncached + 99 001
        // read is over the threshold. 1 000 × 0.5 + 99 001 × 0.05 = 500 + 4 950.05 → 5 450.
        assert_eq!(cost(tokens(1_000, 0, 0, 0, 99_001)), priced(5_450, 5_450));
        // The same under the threshold: 1 000 × 0.1 + 98 999 × 0.01 = 100 + 989.99 → 1 090.
        assert_eq!(cost(tokens(1_000, 0, 0, 0, 98_999)), priced(1_090, 1_090));
        // Writes: an unset 5-minute price is 1.25× the long card's input (0.625), the 1-hour
        // one as set (1.0). 60 000 × 0.625 + 50 000 × 1.0 = 37 500 + 50 000.
        assert_eq!(
            cost(tokens(0, 0, 60_000, 50_000, 0)),
            priced(87_500, 87_500)
        );
        // Searches keep their price at every length: 200 001 × 0.5 + 2 × 10 000 = 120 000.5.
        let mut usage = tokens(200_001, 0, 0, 0, 0);
        usage.web_search_requests = 2;
        assert_eq!(cost(usage), priced(120_001, 120_001));
        // The user's rate applies on top.
        assert_eq!(
            compute_cost(&t, Some("haiku"), &tokens(100_001, 1_000, 0, 0, 0), 5_000),
            priced(52_501, 26_251)
        );
        // The card's rates, defaults filled in from its own input.
        let p = tiered();
        assert_eq!(
            p.rates(100_001, ServiceTier::Standard),
            Rates {
                input: 500_000,
                output: 2_500_000,
                cache_write_5m: 625_000,
                cache_write_1h: 1_000_000,
                cache_read: 50_000,
            }
        );
        assert_eq!(p.rates(100_000, ServiceTier::Standard).input, 100_000);
        assert_eq!(p.rates(u64::MAX, ServiceTier::Standard).input, 500_000);
    }

    #[test]
    fn estimates_of_long_prompts_take_the_long_context_card() {
        let t = table(&[("haiku", tiered())]);
        let haiku = Some("haiku");
        // 400 000 bytes: 100 000 tokens, the standard card: 10 000 + 1 000 × 0.5.
        assert_eq!(
            estimate_cost(&t, haiku, 400_000, Some(1_000), 10_000),
            10_500
        );
        // 400 004 bytes: 100 001 tokens, the long card: 50 000.5 + 2 500 → 52 501.
        assert_eq!(
            estimate_cost(&t, haiku, 400_004, Some(1_000), 10_000),
            52_501
        );
    }

    #[test]
    fn estimates_take_the_card_of_the_tier_asked_for() {
        let p = ModelPrice {
            fast: Some(TierPrice {
                input: 8_000_000,
                output: 40_000_000,
                ..TierPrice::default()
            }),
            ..price(4_000_000, 20_000_000)
        };
        let t = table(&[("opus", p)]);
        let at = |tier| estimate_cost_at(&t, Some("opus"), 4_000, Some(100), tier, 0, 10_000);
        // 1 000 in, 100 out: 4 000 + 2 000 standard, twice that fast; no priority card.
        assert_eq!(at(ServiceTier::Standard), 6_000);
        assert_eq!(at(ServiceTier::Fast), 12_000);
        assert_eq!(at(ServiceTier::Priority), 6_000);
    }

    #[test]
    fn price_list_reads_long_context_tables() {
        let text = "
[models.\"claude-haiku-5-5\"]
input = 100000
output = 500000
cache_read = 10000
web_search = 10000

[models.\"claude-haiku-5-5\".long_context]   # prompts over 100K tokens
above_tokens = 100_000
input = 500000
output = 2500000
cache_write_1h = 1000000
cache_read = 50000

[models.flat]
input = 1
output = 2

[models.bare.long_context]
";
        let err = PriceTable::from_toml_str(text).unwrap_err();
        // A long_context table needs its model's table right before it.
        assert!(
            matches!(err, PriceError::Syntax { line: 19, ref message } if message.contains("must follow")),
            "{err:?}"
        );
        let t =
            PriceTable::from_toml_str(&text.replace("[models.bare.long_context]\n", "")).unwrap();
        assert_eq!(*t.get("claude-haiku-5-5-20261007").unwrap(), tiered());
        assert_eq!(t.get("flat").unwrap().long_context, None);
        // Bare names take a long_context table too.
        let t = PriceTable::from_toml_str(
            "[models.m]\ninput = 1\noutput = 2\n[models.m.long_context]\nabove_tokens = 5\ninput = 3\noutput = 4\n",
        )
        .unwrap();
        assert_eq!(
            t.get("m").unwrap().long_context,
            Some(LongContextPrice {
                above_tokens: 5,
                input: 3,
                output: 4,
                ..LongContextPrice::default()
            })
        );
        let head = "[models.m]\ninput = 1\noutput = 2\n";
        let syntax_cases: &[(&str, &str, usize)] = &[
            (
                "twice",
                "[models.m.long_context]\nabove_tokens = 1\ninput = 1\noutput = 1\n[models.m.long_context]\n",
                8,
            ),
            ("another model's", "[models.n.long_context]\n", 4),
            ("searches", "[models.m.long_context]\nweb_search = 1\n", 5),
            ("threshold outside", "above_tokens = 1\n", 4),
            ("negative threshold", "[models.m.long_context]\nabove_tokens = -1\n", 5),
            ("unknown key", "[models.m.long_context]\ncache = 1\n", 5),
            ("unknown table", "[models.m.tiers]\n", 4),
            ("quoted unknown table", "[models.\"m\".tiers]\n", 4),
        ];
        for (name, tail, line) in syntax_cases {
            match PriceTable::from_toml_str(&format!("{head}{tail}")) {
                Err(PriceError::Syntax { line: got, .. }) => assert_eq!(got, *line, "{name}"),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert!(matches!(
            PriceTable::from_toml_str(&format!(
                "{head}[models.m.long_context]\nabove_tokens = 0\ninput = 1\noutput = 1\n"
            )),
            Err(PriceError::Syntax { line: 5, ref message }) if message.contains("1 or more")
        ));
        for (tail, field) in [
            ("input = 1\noutput = 1\n", "long_context.above_tokens"),
            ("above_tokens = 1\noutput = 1\n", "long_context.input"),
            ("above_tokens = 1\ninput = 1\n", "long_context.output"),
        ] {
            assert_eq!(
                PriceTable::from_toml_str(&format!("{head}[models.m.long_context]\n{tail}")),
                Err(PriceError::MissingField {
                    model: "m".into(),
                    field
                })
            );
        }
    }

    #[test]
    fn service_tiers_take_their_own_card() {
        // GPT-5.5-like: $5 / $30, priority $12.50 / $75 (cached $1.25), flex half price, long
        // prompts over 272 000 at $10 / $45.
        let p = ModelPrice {
            cache_read: Some(500_000),
            long_context: Some(LongContextPrice {
                above_tokens: 272_000,
                input: 10_000_000,
                output: 45_000_000,
                cache_read: Some(1_000_000),
                ..LongContextPrice::default()
            }),
            priority: Some(TierPrice {
                input: 12_500_000,
                output: 75_000_000,
                cache_read: Some(1_250_000),
                ..TierPrice::default()
            }),
            flex: Some(TierPrice {
                input: 2_500_000,
                output: 15_000_000,
                ..TierPrice::default()
            }),
            ..price(5_000_000, 30_000_000)
        };
        let t = table(&[("gpt", p), ("plain", price(1_000_000, 2_000_000))]);
        let usage = tokens(1_000, 100, 0, 0, 10_000);
        let cost = |model, tier| compute_cost_at(&t, Some(model), &usage, tier, 0, 10_000);
        // 1 000 × 5 + 10 000 × 0.5 + 100 × 30 = 13 000.
        assert_eq!(cost("gpt", ServiceTier::Standard), priced(13_000, 13_000));
        assert_eq!(
            compute_cost(&t, Some("gpt"), &usage, 10_000),
            priced(13_000, 13_000)
        );
        // 1 000 × 12.5 + 10 000 × 1.25 + 100 × 75 = 32 500.
        assert_eq!(cost("gpt", ServiceTier::Priority), priced(32_500, 32_500));
        // Flex: 1 000 × 2.5 + 10 000 × 0.25 (0.1 × its input) + 100 × 15 = 6 500.
        assert_eq!(cost("gpt", ServiceTier::Flex), priced(6_500, 6_500));
        // A model without a card for the tier: the standard prices.
        for tier in [ServiceTier::Priority, ServiceTier::Fast] {
            assert_eq!(cost("plain", tier), cost("plain", ServiceTier::Standard));
            assert_eq!(
                cost("gpt", ServiceTier::Fast),
                cost("gpt", ServiceTier::Standard)
            );
        }
        // Anthropic's fast mode: its own card, its cache prices as set.
        let opus = ModelPrice {
            cache_read: Some(200_000),
            fast: Some(TierPrice {
                input: 8_000_000,
                output: 40_000_000,
                cache_read: Some(400_000),
                ..TierPrice::default()
            }),
            ..price(4_000_000, 20_000_000)
        };
        let anthropic = table(&[("opus", opus)]);
        // 1 000 × 8 + 10 000 × 0.4 + 100 × 40 = 16 000; standard 4 000 + 2 000 + 2 000.
        assert_eq!(
            compute_cost_at(
                &anthropic,
                Some("opus"),
                &usage,
                ServiceTier::Fast,
                0,
                10_000
            ),
            priced(16_000, 16_000)
        );
        assert_eq!(
            compute_cost(&anthropic, Some("opus"), &usage, 10_000),
            priced(8_000, 8_000)
        );
        // Over the long-context threshold the long card applies whatever the tier.
        let long = tokens(300_000, 0, 0, 0, 0);
        for tier in [
            ServiceTier::Standard,
            ServiceTier::Priority,
            ServiceTier::Flex,
        ] {
            assert_eq!(
                compute_cost_at(&t, Some("gpt"), &long, tier, 0, 10_000),
                priced(3_000_000, 3_000_000),
                "{tier:?}"
            );
        }
        // GPT-5.6-like: long prompts have their own card at each tier (2× and 0.5× the long
        // card); a tier without one (fast) keeps the long card.
        let mut later = p;
        if let Some(long) = later.long_context.as_mut() {
            long.priority = Some(TierPrice {
                input: 20_000_000,
                output: 90_000_000,
                cache_read: Some(2_000_000),
                ..TierPrice::default()
            });
            long.flex = Some(TierPrice {
                input: 5_000_000,
                output: 22_500_000,
                ..TierPrice::default()
            });
        }
        let t = table(&[("gpt", later)]);
        let long = tokens(272_000, 100, 0, 0, 1);
        let at = |tier| compute_cost_at(&t, Some("gpt"), &long, tier, 0, 10_000);
        // 272 000 × 10 + 1 × 1 + 100 × 45 = 2 724 501.
        assert_eq!(at(ServiceTier::Standard), priced(2_724_501, 2_724_501));
        // 272 000 × 20 + 1 × 2 + 100 × 90 = 5 449 002.
        assert_eq!(at(ServiceTier::Priority), priced(5_449_002, 5_449_002));
        // 272 000 × 5 + 1 × 0.5 (0.1 × the card's input) + 100 × 22.5 = 1 362 250.5 → 251.
        assert_eq!(at(ServiceTier::Flex), priced(1_362_251, 1_362_251));
        assert_eq!(at(ServiceTier::Fast), at(ServiceTier::Standard));
        // Under the threshold the model's own tier cards still apply.
        let short = tokens(1_000, 100, 0, 0, 10_000);
        assert_eq!(
            compute_cost_at(&t, Some("gpt"), &short, ServiceTier::Priority, 0, 10_000),
            priced(32_500, 32_500)
        );
        // The answer's names for the tiers.
        assert_eq!(ServiceTier::from_wire("priority"), ServiceTier::Priority);
        assert_eq!(ServiceTier::from_wire("flex"), ServiceTier::Flex);
        assert_eq!(ServiceTier::from_wire("fast"), ServiceTier::Priority);
        for other in ["default", "auto", "standard", "scale", ""] {
            assert_eq!(
                ServiceTier::from_wire(other),
                ServiceTier::Standard,
                "{other}"
            );
        }
    }

    /// An advisor's passes are priced at the advisor's model, added to the request's cost
    /// before the user's rate; an advisor model without a price flags the record.
    #[test]
    fn advisor_passes_are_priced_at_their_own_model() {
        let t = table(&[
            ("sonnet", price(2_000_000, 10_000_000)),
            ("opus", price(4_000_000, 20_000_000)),
        ]);
        let usage = tokens(1_000, 100, 0, 0, 0);
        let advisor = |model: &str| SubUsage {
            model: Some(model.into()),
            tokens: tokens(5_000, 1_500, 0, 0, 0),
        };
        // 2 000 + 1 000 for the executor; 20 000 + 30 000 for the advisor; × 1.5 = 79 500.
        let cost = compute_cost_with_subs(
            &t,
            Some("sonnet"),
            &usage,
            ServiceTier::Standard,
            &[advisor("opus")],
            0,
            15_000,
        );
        assert_eq!(cost, priced(53_000, 79_500));
        // Two passes, each counted.
        let two = [advisor("opus"), advisor("opus")];
        assert_eq!(
            compute_cost_with_subs(
                &t,
                Some("sonnet"),
                &usage,
                ServiceTier::Standard,
                &two,
                0,
                10_000
            ),
            priced(103_000, 103_000)
        );
        // No passes: the request alone, as compute_cost prices it.
        assert_eq!(
            compute_cost_with_subs(
                &t,
                Some("sonnet"),
                &usage,
                ServiceTier::Standard,
                &[],
                0,
                15_000
            ),
            compute_cost(&t, Some("sonnet"), &usage, 15_000)
        );
        // An unpriced advisor: the executor billed, the record flagged.
        let cost = compute_cost_with_subs(
            &t,
            Some("sonnet"),
            &usage,
            ServiceTier::Standard,
            &[advisor("mystery")],
            0,
            10_000,
        );
        assert_eq!((cost.base, cost.unpriced), (3_000, true));
    }

    /// A compaction's summary pass is priced on the request's model, on its own: its prompt
    /// and the answer's are measured against the long-context threshold apart.
    #[test]
    fn compaction_passes_are_priced_on_their_own_prompt() {
        let t = table(&[("haiku", tiered())]);
        // Summary 95 000 in / 3 500 out, answer 8 000 in / 1 000 out: neither is over
        // 100 000, so both at the first card: 9 500 + 1 750 + 800 + 500 = 12 550.
        let summary = SubUsage {
            model: None,
            tokens: tokens(95_000, 3_500, 0, 0, 0),
        };
        let answer = tokens(8_000, 1_000, 0, 0, 0);
        let cost = |subs: &[SubUsage], tier| {
            compute_cost_with_subs(&t, Some("haiku"), &answer, tier, subs, 0, 10_000)
        };
        assert_eq!(
            cost(&[summary], ServiceTier::Standard),
            priced(12_550, 12_550)
        );
        // A summary over the threshold is priced at the long card alone: 150 000 × 0.5 +
        // 3 500 × 2.5 = 83 750, plus the answer's 1 300.
        let long = SubUsage {
            model: None,
            tokens: tokens(150_000, 3_500, 0, 0, 0),
        };
        assert_eq!(cost(&[long], ServiceTier::Standard), priced(85_050, 85_050));
    }

    #[test]
    fn price_list_reads_service_tier_tables() {
        let text = "
[models.\"gpt-5.5\"]
input = 5000000
output = 30000000
cache_read = 500000

[models.\"gpt-5.5\".long_context]
above_tokens = 272000
input = 10000000
output = 45000000

[models.\"gpt-5.5\".priority]
input = 12500000
output = 75000000
cache_read = 1250000

[models.\"gpt-5.5\".flex]     # half price
input = 2500000
output = 15000000

[models.next]
input = 1
output = 2

[models.\"claude-opus-5-5\"]
input = 4000000
output = 20000000

[models.\"claude-opus-5-5\".fast]
input = 8000000
output = 40000000
cache_read = 400000

[models.\"gpt-5.6\"]
input = 5000000
output = 30000000

[models.\"gpt-5.6\".long_context]
above_tokens = 272000
input = 10000000
output = 45000000

[ models . \"gpt-5.6\" . long_context . priority ]
input = 20000000
output = 90000000
cache_read = 2000000

[models.\"gpt-5.6\".long_context.flex]
input = 5000000
output = 22500000
";
        let t = PriceTable::from_toml_str(text).unwrap();
        let p = t.get("gpt-5.5").unwrap();
        assert_eq!(p.long_context.map(|l| l.above_tokens), Some(272_000));
        assert_eq!(
            p.priority,
            Some(TierPrice {
                input: 12_500_000,
                output: 75_000_000,
                cache_read: Some(1_250_000),
                ..TierPrice::default()
            })
        );
        assert_eq!(
            p.flex.map(|f| (f.input, f.output)),
            Some((2_500_000, 15_000_000))
        );
        assert_eq!(t.get("next").unwrap().priority, None);
        assert_eq!(
            t.get("claude-opus-5-5")
                .unwrap()
                .fast
                .map(|f| (f.input, f.cache_read)),
            Some((8_000_000, Some(400_000)))
        );
        let long = t.get("gpt-5.6").unwrap().long_context.unwrap();
        assert_eq!(
            (long.input, long.cache_read),
            (10_000_000, None),
            "the long card keeps its own keys"
        );
        assert_eq!(
            long.priority,
            Some(TierPrice {
                input: 20_000_000,
                output: 90_000_000,
                cache_read: Some(2_000_000),
                ..TierPrice::default()
            })
        );
        assert_eq!(
            long.flex.map(|f| (f.input, f.output)),
            Some((5_000_000, 22_500_000))
        );
        assert_eq!(
            (long.fast, t.get("gpt-5.6").unwrap().priority),
            (None, None)
        );
        let head = "[models.m]\ninput = 1\noutput = 2\n";
        let syntax_cases: &[(&str, &str, usize)] = &[
            (
                "twice",
                "[models.m.flex]\ninput = 1\noutput = 1\n[models.m.flex]\n",
                7,
            ),
            ("another model's", "[models.n.priority]\n", 4),
            ("searches", "[models.m.priority]\nweb_search = 1\n", 5),
            ("threshold", "[models.m.flex]\nabove_tokens = 1\n", 5),
            (
                "after another model",
                "[models.n]\ninput = 1\noutput = 1\n[models.m.flex]\n",
                7,
            ),
            ("an unknown tier", "[models.m.long_context.batch]\n", 4),
            ("too deep", "[models.m.long_context.flex.x]\n", 4),
            (
                "a threshold in a long tier",
                "[models.m.long_context.flex]\nabove_tokens = 1\n",
                5,
            ),
            (
                "a long tier twice",
                "[models.m.long_context.flex]\ninput = 1\noutput = 1\n[models.m.long_context.flex]\n",
                7,
            ),
        ];
        for (name, tail, line) in syntax_cases {
            match PriceTable::from_toml_str(&format!("{head}{tail}")) {
                Err(PriceError::Syntax { line: got, .. }) => assert_eq!(got, *line, "{name}"),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert_eq!(
            PriceTable::from_toml_str(&format!("{head}[models.m.priority]\ninput = 1\n")),
            Err(PriceError::MissingField {
                model: "m".into(),
                field: "priority.output"
            })
        );
        // A long prompt's tier card needs the long card it belongs to.
        assert_eq!(
            PriceTable::from_toml_str(&format!(
                "{head}[models.m.long_context.priority]\ninput = 1\noutput = 1\n"
            )),
            Err(PriceError::MissingField {
                model: "m".into(),
                field: "long_context"
            })
        );
        assert_eq!(
            PriceTable::from_toml_str(&format!(
                "{head}[models.m.long_context]\nabove_tokens = 9\ninput = 1\noutput = 1\n\
                 [models.m.long_context.fast]\noutput = 1\n"
            )),
            Err(PriceError::MissingField {
                model: "m".into(),
                field: "long_context.fast.input"
            })
        );
        // Keys after a sub-table go to it, not to the model's own table.
        let t = PriceTable::from_toml_str(&format!(
            "{head}[models.m.flex]\ninput = 3\noutput = 4\ncache_read = 5\n"
        ))
        .unwrap();
        let m = t.get("m").unwrap();
        assert_eq!(
            (m.cache_read, m.flex.and_then(|f| f.cache_read)),
            (None, Some(5))
        );
    }

    #[test]
    fn long_context_serde_nests_the_card() {
        let json = r#"{"input":1,"output":2,"long_context":{"above_tokens":200000,"input":3,"output":4,"cache_read":1}}"#;
        let p: ModelPrice = serde_json::from_str(json).unwrap();
        assert_eq!(
            p.long_context,
            Some(LongContextPrice {
                above_tokens: 200_000,
                input: 3,
                output: 4,
                cache_read: Some(1),
                ..LongContextPrice::default()
            })
        );
        assert_eq!(serde_json::to_string(&p).unwrap(), json);
        assert!(serde_json::from_str::<ModelPrice>(
            r#"{"input":1,"output":2,"long_context":{"above_tokens":1,"input":3,"output":4,"web_search":1}}"#
        )
        .is_err());
        assert!(serde_json::from_str::<ModelPrice>(
            r#"{"input":1,"output":2,"long_context":{"input":3,"output":4}}"#
        )
        .is_err());
        assert_eq!(
            tiered().all_prices().collect::<Vec<_>>(),
            [100_000, 500_000, 10_000, 500_000, 2_500_000, 1_000_000, 50_000, 10_000]
        );
    }

    #[test]
    fn absurd_numbers_saturate_instead_of_panicking() {
        let t = table(&[
            ("m", price(i64::MAX, i64::MAX)),
            ("neg", price(-3_000_000, 0)),
        ]);
        let huge = tokens(u64::MAX, u64::MAX, u64::MAX, u64::MAX, u64::MAX);
        let cost = compute_cost(&t, Some("m"), &huge, i64::MAX);
        assert_eq!(cost.base, i64::MAX);
        assert_eq!(cost.billed, i64::MAX);
        let cost = compute_cost(&t, Some("m"), &huge, i64::MIN);
        assert_eq!(cost.billed, i64::MIN);
        // A negative admin price (a credit) rounds half up too: -4.5 → -4.
        let cost = compute_cost(&t, Some("neg"), &tokens(1, 0, 0, 0, 0), 15_000);
        assert_eq!(cost, priced(-3, -4));
        assert_eq!(
            price(i64::MAX, 0)
                .rates(0, ServiceTier::Standard)
                .cache_write_1h,
            i64::MAX
        );
    }
}
