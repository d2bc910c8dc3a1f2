/*
 * utp_ledbat.c -- round-trip estimation (RFC 6298) and LEDBAT congestion
 * control (RFC 6817, BEP 29).
 *
 * LEDBAT keeps the queueing delay its own packets cause near a target
 * (100 ms by default, UTP_TARGET_DELAY): the one-way delay is measured from
 * the peer's timestamp_difference field, the smallest delay seen over the
 * last two to three minutes is the base (propagation), and the window grows
 * or shrinks in proportion to how far the current queueing delay is from the
 * target, by at most 3000 bytes per round trip as libutp and libtorrent do.
 */
#include "utp_internal.h"

#define MAX_CWND_INCREASE_BYTES_PER_RTT 3000.0
#define MINUTE_US 60000000ull

static uint32 min_rto_us(const utp_socket *s) { return s->ctx->min_rto_ms * 1000u; }
static uint32 max_rto_us(const utp_socket *s) { return s->ctx->max_rto_ms * 1000u; }

static uint32 mss(const utp_socket *s) { return utp_out_payload_max(s); }

void utp_cc_init(utp_socket *s)
{
	s->cwnd = 4 * mss(s);
	s->cwnd_exact = s->cwnd;
	s->ssthresh = 0x7fffffffu;
	s->slow_start = 1;
	s->rtt_valid = 0;
	s->dupthresh = 3;
	s->reo_wnd_mult = 1;
	s->rto = utp_rto_base(s);
	s->pace_burst = UTP_PACE_BURST_START;
	s->pace_tokens = UTP_PACE_BURST_START;
}

uint32 utp_rto_base(const utp_socket *s)
{
	uint64 rto;
	if (!s->rtt_valid)
		rto = 1000000u;  /* RFC 6298 2.1: 1 s before the first sample */
	else
		rto = (uint64)s->srtt + UTP_MAX(4u * s->rttvar, 1000u);
	rto = UTP_MAX(rto, (uint64)min_rto_us(s));
	return (uint32)UTP_MIN(rto, (uint64)max_rto_us(s));
}

void utp_rto_backoff(utp_socket *s)
{
	uint64 rto = (uint64)s->rto * 2;
	s->rto = (uint32)UTP_MIN(rto, (uint64)max_rto_us(s));
}

void utp_rtt_sample(utp_socket *s, uint32 r)
{
	if (s->min_rtt == 0 || r < s->min_rtt)
		s->min_rtt = r ? r : 1;
	if (!s->rtt_valid) {
		s->srtt = r;
		s->rttvar = r / 2;
		s->rtt_valid = 1;
	} else {
		uint32 delta = s->srtt > r ? s->srtt - r : r - s->srtt;
		s->rttvar = (3 * s->rttvar + delta) / 4;
		s->srtt = (7 * s->srtt + r) / 8;
	}
	s->rto = utp_rto_base(s);
}

/* Delay values are 32-bit microsecond differences that wrap; compare them
 * by signed distance. */
static uint32 delay_min(uint32 a, uint32 b) { return (int32)(a - b) < 0 ? a : b; }

void utp_delay_add(utp_delay_hist *h, uint32 sample, uint64 now)
{
	uint32 i;
	if (h->nsamples == 0 || now - h->minute_start >= UTP_DELAY_BASE_MINUTES * MINUTE_US) {
		for (i = 0; i < UTP_DELAY_BASE_MINUTES; i++)
			h->base_min[i] = sample;
		h->minute_start = now;
		h->minute_idx = 0;
	}
	while (now - h->minute_start >= MINUTE_US) {
		h->minute_idx = (h->minute_idx + 1) % UTP_DELAY_BASE_MINUTES;
		h->base_min[h->minute_idx] = sample;
		h->minute_start += MINUTE_US;
	}
	h->base_min[h->minute_idx] = delay_min(h->base_min[h->minute_idx], sample);
	h->cur[h->cur_idx] = sample;
	h->cur_idx = (h->cur_idx + 1) % UTP_DELAY_CUR_SAMPLES;
	h->nsamples++;
	h->last_sample_time = now;
}

uint32 utp_delay_base(const utp_delay_hist *h)
{
	uint32 b, i;
	if (h->nsamples == 0)
		return 0;
	b = h->base_min[0];
	for (i = 1; i < UTP_DELAY_BASE_MINUTES; i++)
		b = delay_min(b, h->base_min[i]);
	return b;
}

/* Current queueing delay: the smallest of the last few samples (filters
 * out single delayed ACKs) above the base. */
uint32 utp_delay_queueing(const utp_delay_hist *h)
{
	uint32 n, i, cur, base;
	if (h->nsamples == 0)
		return 0;
	n = UTP_MIN(h->nsamples, (uint32)UTP_DELAY_CUR_SAMPLES);
	cur = h->cur[(h->cur_idx + UTP_DELAY_CUR_SAMPLES - 1) % UTP_DELAY_CUR_SAMPLES];
	for (i = 0; i < n; i++)
		cur = delay_min(cur, h->cur[(h->cur_idx + UTP_DELAY_CUR_SAMPLES - 1 - i) % UTP_DELAY_CUR_SAMPLES]);
	base = utp_delay_base(h);
	return (int32)(cur - base) > 0 ? cur - base : 0;
}

static uint32 cwnd_cap(const utp_socket *s)
{
	return (uint32)UTP_WINDOW_PACKETS_MAX * mss(s);
}

/* Never below one packet, never beyond what the peer's reorder buffer takes. */
static void set_cwnd(utp_socket *s, double cwnd)
{
	if (cwnd < mss(s))
		cwnd = mss(s);
	if (cwnd > cwnd_cap(s))
		cwnd = cwnd_cap(s);
	s->cwnd_exact = cwnd;
	s->cwnd = (uint32)cwnd;
}

void utp_cc_on_ack(utp_socket *s, uint32 bytes_acked, uint32 flight_before)
{
	uint32 q = utp_delay_queueing(&s->our_hist);
	uint32 target = s->target_delay ? s->target_delay : 100000u;
	/* Grow only while the window is what limits us (RFC 7661): an
	 * application that sends little must not build a window it never used. */
	int cwnd_limited = flight_before + mss(s) >= s->cwnd;
	double cwnd = s->cwnd_exact;

	if (s->slow_start) {
		/* Slow start ends before the queue reaches the target: the window
		 * doubles per round trip, so the queue would overshoot by as much
		 * again before the delay signal came back. */
		if ((s->our_hist.nsamples > 0 && q > target / 4) || s->cwnd >= s->ssthresh) {
			s->slow_start = 0;
			s->ssthresh = s->cwnd;
		} else if (cwnd_limited) {
			cwnd += bytes_acked;
		}
	}
	if (!s->slow_start) {
		double off_target = ((double)target - (double)q) / (double)target;
		double window_factor = (double)UTP_MIN(bytes_acked, s->cwnd) / (double)UTP_MAX(s->cwnd, bytes_acked);
		/* Below the target the increase never falls under a fifth of the
		 * maximum: the queue then crosses the target now and again, and the
		 * multiplicative decrease above it evens out competing flows. */
		double up = off_target > 0 && off_target < 0.2 ? 0.2 : off_target;
		double gain = MAX_CWND_INCREASE_BYTES_PER_RTT * window_factor * up;
		if (gain > 0 && !cwnd_limited)
			gain = 0;
		if (off_target < 0) {
			/* Above the target, also shrink in proportion to the window
			 * (LEDBAT++, draft-irtf-iccrg-ledbat-plus-plus 4.2): with only
			 * additive changes two flows keep whatever split they started
			 * with; a multiplicative part makes them converge to equal
			 * shares.  At most half the window per round trip. */
			double md = 4.0 * (double)bytes_acked * (-off_target);
			if (md > bytes_acked / 2.0)
				md = bytes_acked / 2.0;
			gain -= md;
		}
		cwnd += gain;
	}
	set_cwnd(s, cwnd);
}

/* Loss: halve the window, at most once per round trip (until everything
 * that was in flight when the loss was seen is acknowledged). */
void utp_cc_on_loss(utp_socket *s)
{
	if (s->in_recovery)
		return;
	s->in_recovery = 1;
	s->recovery_seq = (uint16)(s->next_send - 1);
	s->prior_cwnd = s->cwnd;
	s->prior_ssthresh = s->ssthresh;
	set_cwnd(s, s->cwnd_exact / 2);
	s->ssthresh = s->cwnd;
	s->slow_start = 0;
	s->loss_events++;
}

/* The loss that cut the window was reordering after all (utp_output.c
 * check_spurious): go back to the window from before the cut. */
void utp_cc_undo(utp_socket *s)
{
	if (s->prior_cwnd == 0)
		return;
	if (s->prior_cwnd > s->cwnd)
		set_cwnd(s, s->prior_cwnd);
	if (s->prior_ssthresh > s->ssthresh)
		s->ssthresh = s->prior_ssthresh;
	s->prior_cwnd = 0;
	s->in_recovery = 0;
}

void utp_cc_on_timeout(utp_socket *s)
{
	s->prior_cwnd = s->cwnd;
	s->prior_ssthresh = s->ssthresh;
	s->ssthresh = UTP_MAX(s->cwnd / 2, 2 * mss(s));
	set_cwnd(s, mss(s));
	s->slow_start = 1;
	s->in_recovery = 1;
	s->recovery_seq = (uint16)(s->next_send - 1);
	s->loss_events++;
}

/* ---- pacing ------------------------------------------------------------------------ */

/* Bytes per microsecond: the usable window (congestion or the peer's, the
 * smaller) per smoothed round trip, with headroom so pacing never limits a
 * flow the window admits -- twice the window in slow start, which doubles
 * it per round trip, and a quarter more afterwards (as Linux paces TCP). */
static double pace_rate(const utp_socket *s)
{
	double wnd = UTP_MIN(s->cwnd, UTP_MAX(s->peer_wnd, mss(s)));
	return (s->slow_start ? 2.0 : 1.25) * wnd / (double)UTP_MAX(s->srtt, 1u);
}

static void pace_refill(utp_socket *s)
{
	uint64 now = s->ctx->now;
	if (now > s->pace_stamp) {
		s->pace_tokens += pace_rate(s) * (double)(now - s->pace_stamp);
		s->pace_stamp = now;
	}
	if (s->pace_tokens > s->pace_burst)
		s->pace_tokens = s->pace_burst;
}

uint64 utp_pace_wait(utp_socket *s, uint32 bytes)
{
	double missing;
	/* Without a round-trip estimate there is no rate; the first window is
	 * small anyway. */
	if (!s->rtt_valid || bytes == 0)
		return 0;
	pace_refill(s);
	bytes = UTP_MIN(bytes, s->pace_burst);
	if (s->pace_tokens >= bytes)
		return 0;
	missing = (double)bytes - s->pace_tokens;
	return s->ctx->now + (uint64)(missing / pace_rate(s)) + 1;
}

void utp_pace_consume(utp_socket *s, uint32 bytes)
{
	if (s->rtt_valid)
		s->pace_tokens -= bytes;
}

/* `run` packets in a row were lost: the burst that carried them was more
 * than the receiver took at once (a full socket buffer drops everything
 * after the point it filled).  Halve the burst, never below the floor and
 * never above the run that was lost. */
void utp_pace_on_burst_loss(utp_socket *s, uint32 run)
{
	uint32 b = UTP_MIN(s->pace_burst / 2, run * mss(s) / 2);
	s->pace_burst = UTP_MAX(b, UTP_PACE_BURST_MIN);
	if (s->pace_tokens > s->pace_burst)
		s->pace_tokens = s->pace_burst;
}

/* Loss-free progress lets the burst grow back by a packet per window. */
void utp_pace_on_ack(utp_socket *s, uint32 bytes_acked)
{
	uint64 b;
	if (s->in_recovery || s->pace_burst >= UTP_PACE_BURST_MAX)
		return;
	b = s->pace_burst + (uint64)bytes_acked * mss(s) / UTP_MAX(s->cwnd, 1u) + 1;
	s->pace_burst = (uint32)UTP_MIN(b, (uint64)UTP_PACE_BURST_MAX);
}
