//! Model prices (micro-USD per million tokens for each token category, and per web search)
//! and the users' price rates applied on top of them.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{now_ms, require_non_empty, Param, Result, SqlParts, SqlStore, StoreError};

/// Prices of one model (micro-USD per million tokens): the same type the cost filter prices with.
pub use relay_filters::cost::{LongContextPrice, ModelPrice, TierPrice};

/// What a price override says of one of the model's extra rate cards (long prompts, a
/// service tier).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CardChoice<T> {
    /// The shipped price list's card, if the model has one (an override that names none, or
    /// one made before such prices were known, must not make those requests cheap).
    #[default]
    Shipped,
    /// No such card: those requests at the override's own prices.
    None,
    /// This card.
    Card(T),
}

/// What an override says of the long-prompt card.
pub type LongContextChoice = CardChoice<LongContextPrice>;

/// What an override says of a service tier's card.
pub type TierChoice = CardChoice<TierPrice>;

impl<T: Copy + serde::Serialize + serde::de::DeserializeOwned> CardChoice<T> {
    /// The column's text: NULL, `none` or the card as JSON.
    fn to_column(self) -> Result<Option<String>> {
        Ok(match self {
            CardChoice::Shipped => None,
            CardChoice::None => Some("none".to_owned()),
            CardChoice::Card(card) => Some(
                serde_json::to_string(&card)
                    .map_err(|e| StoreError::Invalid(format!("rate card: {e}")))?,
            ),
        })
    }

    fn from_column(text: Option<String>) -> Result<CardChoice<T>> {
        Ok(match text.as_deref() {
            None => CardChoice::Shipped,
            Some("none") => CardChoice::None,
            Some(json) => {
                CardChoice::Card(serde_json::from_str(json).map_err(|e| {
                    StoreError::Invalid(format!("stored rate card is not one: {e}"))
                })?)
            }
        })
    }

    /// The card that applies, given the shipped one.
    pub fn resolve(self, shipped: Option<T>) -> Option<T> {
        match self {
            CardChoice::Shipped => shipped,
            CardChoice::None => None,
            CardChoice::Card(card) => Some(card),
        }
    }
}

/// What an override says of the model's extra rate cards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CardChoices {
    /// Prompts over a length.
    pub long_context: LongContextChoice,
    /// The priority service tier.
    pub priority: TierChoice,
    /// The flex service tier.
    pub flex: TierChoice,
    /// Anthropic's fast mode.
    pub fast: TierChoice,
}

impl CardChoices {
    /// `price` with these cards in place of its own, each resolved against `shipped`'s. A
    /// tier dropped (`None`) is dropped for long prompts too: the shipped long card, when
    /// kept, loses its own card for that tier.
    pub fn apply(&self, price: ModelPrice, shipped: Option<&ModelPrice>) -> ModelPrice {
        let mut long_context = self
            .long_context
            .resolve(shipped.and_then(|p| p.long_context));
        if let (CardChoice::Shipped, Some(long)) = (self.long_context, long_context.as_mut()) {
            for (choice, card) in [
                (self.priority, &mut long.priority),
                (self.flex, &mut long.flex),
                (self.fast, &mut long.fast),
            ] {
                if choice == CardChoice::None {
                    *card = None;
                }
            }
        }
        ModelPrice {
            long_context,
            priority: self.priority.resolve(shipped.and_then(|p| p.priority)),
            flex: self.flex.resolve(shipped.and_then(|p| p.flex)),
            fast: self.fast.resolve(shipped.and_then(|p| p.fast)),
            ..price
        }
    }
}

/// A row of `model_prices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelPriceRow {
    /// Model name as the upstream reports it.
    pub model: String,
    /// Uncached input.
    pub input: i64,
    /// Output.
    pub output: i64,
    /// Cache write with the 5-minute TTL.
    pub cache_write_5m: Option<i64>,
    /// Cache write with the 1-hour TTL.
    pub cache_write_1h: Option<i64>,
    /// Cache read.
    pub cache_read: Option<i64>,
    /// Per web search (not per million); unset: the model's shipped price, if any.
    pub web_search: Option<i64>,
    /// The rate cards for long prompts and the service tiers.
    #[serde(skip)]
    pub cards: CardChoices,
    /// Epoch ms of the last change.
    pub updated_at: i64,
    /// A scheduled override: the epoch ms it takes effect at (`None`: the override in effect
    /// until then, or always).
    pub from_ms: Option<i64>,
}

/// `rows` by model (each model's standing override and those scheduled for it).
pub fn overrides_by_model(rows: &[ModelPriceRow]) -> BTreeMap<&str, Vec<&ModelPriceRow>> {
    let mut by_model: BTreeMap<&str, Vec<&ModelPriceRow>> = BTreeMap::new();
    for row in rows {
        by_model.entry(row.model.as_str()).or_default().push(row);
    }
    by_model
}

/// Of one model's overrides, the one in effect at `at_ms`: the latest that has begun, a
/// standing one (no `from_ms`) from the start.
pub fn override_at<'a>(rows: &[&'a ModelPriceRow], at_ms: i64) -> Option<&'a ModelPriceRow> {
    rows.iter()
        .copied()
        .filter(|r| r.from_ms.is_none_or(|from| from <= at_ms))
        .max_by_key(|r| r.from_ms.unwrap_or(i64::MIN))
}

impl ModelPriceRow {
    /// The prices without the model name and timestamp; the extra cards only where the
    /// override sets them (see [`CardChoice::resolve`] for the shipped ones).
    pub fn price(&self) -> ModelPrice {
        let own = ModelPrice {
            input: self.input,
            output: self.output,
            cache_write_5m: self.cache_write_5m,
            cache_write_1h: self.cache_write_1h,
            cache_read: self.cache_read,
            web_search: self.web_search,
            ..ModelPrice::default()
        };
        self.cards.apply(own, None)
    }
}

/// Builds a [`ModelPriceRow`] from a `model_prices` row.
fn price_from_row(row: &AnyRow) -> Result<ModelPriceRow> {
    Ok(ModelPriceRow {
        model: row.try_get("model")?,
        input: row.try_get("input")?,
        output: row.try_get("output")?,
        cache_write_5m: row.try_get("cache_write_5m")?,
        cache_write_1h: row.try_get("cache_write_1h")?,
        cache_read: row.try_get("cache_read")?,
        web_search: row.try_get("web_search")?,
        cards: CardChoices {
            long_context: CardChoice::from_column(row.try_get("long_context")?)?,
            priority: CardChoice::from_column(row.try_get("priority")?)?,
            flex: CardChoice::from_column(row.try_get("flex")?)?,
            fast: CardChoice::from_column(row.try_get("fast")?)?,
        },
        updated_at: row.try_get("updated_at")?,
        from_ms: None,
    })
}

/// The columns of `model_prices`, also those of `model_price_changes` but `from_ms`.
const PRICE_COLUMNS: &str = "model, input, output, cache_write_5m, cache_write_1h, cache_read, \
     web_search, long_context, priority, flex, fast, updated_at";

/// What an upsert of an override sets on a conflict: every column but the key.
const PRICE_UPDATES: &str = "input = excluded.input, output = excluded.output, \
     cache_write_5m = excluded.cache_write_5m, cache_write_1h = excluded.cache_write_1h, \
     cache_read = excluded.cache_read, web_search = excluded.web_search, \
     long_context = excluded.long_context, priority = excluded.priority, flex = excluded.flex, \
     fast = excluded.fast, updated_at = excluded.updated_at";

impl ModelPriceRow {
    /// The row an upsert of `model`'s override stores (`from_ms`: scheduled then): checked
    /// for a name and for prices that are not negative. The extra cards of `price` are not
    /// read: `cards` says what the override does with each.
    fn new_override(
        model: &str,
        price: &ModelPrice,
        cards: CardChoices,
        from_ms: Option<i64>,
    ) -> Result<ModelPriceRow> {
        require_non_empty("model", model)?;
        if cards.apply(*price, None).all_prices().any(|p| p < 0) {
            return Err(StoreError::Invalid(
                "prices must not be negative".to_owned(),
            ));
        }
        Ok(ModelPriceRow {
            model: model.to_owned(),
            input: price.input,
            output: price.output,
            cache_write_5m: price.cache_write_5m,
            cache_write_1h: price.cache_write_1h,
            cache_read: price.cache_read,
            web_search: price.web_search,
            cards,
            updated_at: now_ms(),
            from_ms,
        })
    }

    /// Binds the columns after the key (`model`, and `from_ms` of a scheduled one), in
    /// [`PRICE_COLUMNS`] order.
    fn bind_values<'q>(
        &self,
        query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    ) -> Result<sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>> {
        Ok(query
            .bind(self.input)
            .bind(self.output)
            .bind(self.cache_write_5m)
            .bind(self.cache_write_1h)
            .bind(self.cache_read)
            .bind(self.web_search)
            .bind(self.cards.long_context.to_column()?)
            .bind(self.cards.priority.to_column()?)
            .bind(self.cards.flex.to_column()?)
            .bind(self.cards.fast.to_column()?)
            .bind(self.updated_at))
    }
}

impl SqlStore {
    /// Sets the prices of a model, creating or replacing its row. The extra cards of `price`
    /// are not read: `cards` says what the override does with each.
    pub async fn upsert_price(
        &self,
        model: &str,
        price: &ModelPrice,
        cards: CardChoices,
    ) -> Result<ModelPriceRow> {
        let row = ModelPriceRow::new_override(model, price, cards, None)?;
        let sql = format!(
            "INSERT INTO model_prices ({PRICE_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (model) DO UPDATE SET {PRICE_UPDATES}"
        );
        let insert = row.bind_values(sqlx::query(&sql).bind(model))?;
        let mut tx = self.pool.begin().await?;
        // Scheduled overrides that have begun are this one's past: it replaces them, in the
        // same transaction (never one without the other).
        sqlx::query("DELETE FROM model_price_changes WHERE model = $1 AND from_ms <= $2")
            .bind(model)
            .bind(row.updated_at)
            .execute(&mut *tx)
            .await?;
        insert.execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(row)
    }

    /// Schedules a model's override from `from_ms` (epoch ms) on, creating or replacing the
    /// one scheduled for that time. As [`SqlStore::upsert_price`] otherwise.
    pub async fn upsert_price_change(
        &self,
        model: &str,
        from_ms: i64,
        price: &ModelPrice,
        cards: CardChoices,
    ) -> Result<ModelPriceRow> {
        let row = ModelPriceRow::new_override(model, price, cards, Some(from_ms))?;
        let sql = format!(
            "INSERT INTO model_price_changes (model, from_ms, {}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
             ON CONFLICT (model, from_ms) DO UPDATE SET {PRICE_UPDATES}",
            PRICE_COLUMNS.trim_start_matches("model, ")
        );
        row.bind_values(sqlx::query(&sql).bind(model).bind(from_ms))?
            .execute(&self.pool)
            .await?;
        Ok(row)
    }

    /// Cancels the override scheduled for `model` at `from_ms`.
    pub async fn delete_price_change(&self, model: &str, from_ms: i64) -> Result<()> {
        let done = sqlx::query("DELETE FROM model_price_changes WHERE model = $1 AND from_ms = $2")
            .bind(model)
            .bind(from_ms)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// Every override: the standing ones, then those scheduled (by model and time).
    pub async fn list_price_overrides(&self) -> Result<Vec<ModelPriceRow>> {
        let mut rows = self.list_prices().await?;
        rows.extend(self.list_price_changes().await?);
        Ok(rows)
    }

    /// Every scheduled override, by model and time.
    pub async fn list_price_changes(&self) -> Result<Vec<ModelPriceRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {PRICE_COLUMNS}, from_ms FROM model_price_changes ORDER BY model, from_ms"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(ModelPriceRow {
                    from_ms: Some(row.try_get("from_ms")?),
                    ..price_from_row(row)?
                })
            })
            .collect()
    }

    /// Removes a model's override in effect now: its standing one and the scheduled ones that
    /// have begun, in one transaction (the shipped price, if any, applies again until a
    /// scheduled one still to come). How many scheduled ones went with it.
    pub async fn delete_price(&self, model: &str) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let standing = sqlx::query("DELETE FROM model_prices WHERE model = $1")
            .bind(model)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let begun =
            sqlx::query("DELETE FROM model_price_changes WHERE model = $1 AND from_ms <= $2")
                .bind(model)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if standing + begun == 0 {
            return Err(StoreError::NotFound);
        }
        tx.commit().await?;
        Ok(begun)
    }

    /// Every model price, by model name.
    pub async fn list_prices(&self) -> Result<Vec<ModelPriceRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {PRICE_COLUMNS} FROM model_prices ORDER BY model"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(price_from_row).collect()
    }

    /// Sets the price rate (ten-thousandths, 10000 = 1.0) of every user in one statement;
    /// returns how many users were updated. Their `updated_at` moves, so every node's key
    /// cache picks the new rate up.
    pub async fn set_all_price_rates(&self, rate: i64) -> Result<u64> {
        if rate < 0 {
            return Err(StoreError::Invalid(
                "price rate must not be negative".to_owned(),
            ));
        }
        let mut parts = SqlParts::default();
        parts.set("price_rate", Param::Int(Some(rate)));
        parts.bump_updated_at();
        let sql = format!("UPDATE users SET {}", parts.joined(", "));
        Ok(parts
            .bind(sqlx::query(&sql))
            .execute(&self.pool)
            .await?
            .rows_affected())
    }
}
