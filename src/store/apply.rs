//! The engine's effects as RocksDB writes: each effect is a put (or, for a finished
//! hold, a delete) in the batch being built, under the key layout of [`super::keys`]
//! and the encodings of [`super::codec`]; rollup increments are summed by cell and
//! staged as merge operands when the batch is written ([`super::rollups::Staged`]).

use super::schema::Cf;
use super::writer::Pending;
use super::{codec, keys, StoreError};
use crate::engine::{Effect, OutboxIndex};

/// Stages one command's effects in the batch, in order.
///
/// # Errors
/// Only when the database cannot be written (it is being reopened); the whole batch is
/// then answered with that error.
pub(super) fn apply(pending: &mut Pending<'_>, effects: &[Effect]) -> Result<(), StoreError> {
    for effect in effects {
        apply_one(pending, effect)?;
    }
    Ok(())
}

fn apply_one(p: &mut Pending<'_>, effect: &Effect) -> Result<(), StoreError> {
    match effect {
        Effect::Click(c) => p.put(Cf::Clicks, keys::click(&c.click_id), codec::encode_click(c)),
        Effect::Visitor { link, visitor, record } => p.put(Cf::Visitors, keys::visitor(link, visitor), record.encode()),
        Effect::Pace { merchant, partner, pace } => p.put(Cf::Signals, keys::pace(merchant, partner), pace.encode()),
        Effect::Recent { merchant, partner, visitor, recent } => {
            p.put(Cf::Signals, keys::recent(merchant, partner, visitor), recent.encode())
        }
        Effect::Review { merchant, conversion_id, txn, open: true } => {
            p.put(Cf::Signals, keys::review(merchant, conversion_id), txn.as_str().as_bytes().to_vec())
        }
        Effect::Review { merchant, conversion_id, open: false, .. } => {
            p.delete(Cf::Signals, keys::review(merchant, conversion_id))
        }
        Effect::Conversion(rec) => p.write(Cf::Conversions, keys::conversion(&rec.merchant_id, &rec.txn_id), &**rec),
        Effect::Ledger(e) => {
            p.ledger.push(e.kind);
            p.put(Cf::LedgerOrder, keys::ledger_order(&e.merchant_id, &e.entry_id), e.partner_id.as_str().into())?;
            p.put(Cf::Ledger, keys::ledger(&e.merchant_id, &e.partner_id, &e.entry_id), codec::encode_ledger(e))
        }
        Effect::PartnerConversion { partner, conversion_id, merchant, txn } => p.put(
            Cf::PartnerConversions,
            keys::partner_conversion(partner, conversion_id),
            keys::conversion(merchant, txn),
        ),
        Effect::Payout(run) => p.write(Cf::Payouts, keys::payout(&run.merchant_id, &run.request.payout_id), &**run),
        Effect::Earned { merchant, partner, currency, day, delta } => {
            p.merge(Cf::Earned, &keys::earned(merchant, *currency, partner, *day), &delta.to_be_bytes())
        }
        Effect::Balance { merchant, partner, currency, balance } => {
            p.put(Cf::Balances, keys::balance(merchant, partner, *currency), codec::encode_balance(balance))
        }
        Effect::Rollup(inc) => {
            if p.shared.rollups {
                p.rollups.add(inc);
            }
            Ok(())
        }
        Effect::LedgerHead(id) => {
            p.ledger_head = Some(id.0);
            Ok(())
        }
        Effect::Account { merchant, record } => {
            p.write(Cf::Accounts, keys::account(merchant, &record.account), &**record)
        }
        Effect::Customer { merchant, customer, binding } => {
            p.write(Cf::Customers, keys::customer(merchant, customer), binding)
        }
        Effect::PartnerMonth { merchant, partner, month, stats } => {
            p.put(Cf::PartnerMonths, keys::partner_month(merchant, partner, *month), codec::encode_month(stats))
        }
        Effect::Adjustment { merchant, record } => {
            p.write(Cf::Adjustments, keys::adjustment(merchant, &record.input.adjustment_id), &**record)
        }
        Effect::Deal { partner, deal_id, answer } => p.write(Cf::Deals, keys::deal(partner, deal_id), &**answer),
        Effect::HoldSet(h) => p.put(Cf::Holds, keys::hold(h.at, &h.merchant, &h.txn), Vec::new()),
        Effect::HoldDone(h) => p.delete(Cf::Holds, keys::hold(h.at, &h.merchant, &h.txn)),
        Effect::Merchant(m) => p.write(Cf::Merchants, keys::merchant(&m.id), &**m),
        Effect::MerchantSecrets { merchant, secrets } => {
            p.write(Cf::Secrets, keys::merchant_secrets(merchant), &**secrets)
        }
        Effect::PostbackToken { merchant, hash } => p.write(Cf::Secrets, keys::postback_token(merchant), hash),
        Effect::Partner(partner) => p.write(Cf::Partners, keys::partner(&partner.id), &**partner),
        Effect::PartnerSecrets { partner, secrets } => p.write(Cf::Secrets, keys::partner_secrets(partner), &**secrets),
        Effect::Link(l) => p.write(Cf::Links, keys::link(&l.id), &**l),
        Effect::Plan(plan) => {
            p.write(Cf::Plans, keys::plan(&plan.merchant_id, &plan.id, plan.version_from_ms), &**plan)
        }
        // A new delivery, due at once, lives in its due key (codec::encode_fresh_delivery);
        // once it changes, it is a record of its own, which reads prefer.
        Effect::NewDelivery(d) => match codec::encode_fresh_delivery(d) {
            Some(fresh) => {
                p.put(Cf::Outbox, keys::outbox_timed(keys::OUTBOX_DUE, d.created_ms, &d.merchant_id, &d.id), fresh)
            }
            None => p.write(Cf::Deliveries, keys::delivery(&d.merchant_id, &d.id), &**d),
        },
        Effect::Delivery(d) => p.write(Cf::Deliveries, keys::delivery(&d.merchant_id, &d.id), &**d),
        Effect::DeliveryGone { merchant, id } => p.delete(Cf::Deliveries, keys::delivery(merchant, id)),
        Effect::OutboxIndex(entry, put) => {
            let (key, value) = match entry {
                OutboxIndex::Due { at, merchant, id } => {
                    p.outbox_due |= *put;
                    (keys::outbox_timed(keys::OUTBOX_DUE, *at, merchant, id), Vec::new())
                }
                OutboxIndex::Finished { at, merchant, id } => {
                    (keys::outbox_timed(keys::OUTBOX_FINISHED, *at, merchant, id), Vec::new())
                }
                OutboxIndex::Parked { partner, merchant, id } => {
                    (keys::outbox_parked(partner, id), merchant.as_str().as_bytes().to_vec())
                }
            };
            if *put {
                // Never over a fresh delivery kept in this due key by the same batch.
                if matches!(p.staged(Cf::Outbox, &key), Some(Some(v)) if !v.is_empty()) {
                    return Ok(());
                }
                p.put(Cf::Outbox, key, value)
            } else {
                p.delete(Cf::Outbox, key)
            }
        }
        Effect::Endpoint { partner, off } => match off {
            Some(off) => p.write(Cf::Outbox, keys::outbox_endpoint(partner), off),
            None => p.delete(Cf::Outbox, keys::outbox_endpoint(partner)),
        },
    }
}
