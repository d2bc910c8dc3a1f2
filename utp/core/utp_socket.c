/*
 * utp_socket.c -- the public socket calls and the connection state machine.
 *
 * States (UTPKIT_SOCK_*):
 *   IDLE --connect--> SYN_SENT --ACK of SYN--> CONNECTED --close--> CLOSING
 *   (SYN received) ----------------------------> CONNECTED
 *   any --RESET / timeout / ICMP--> ERROR;  close in IDLE/SYN_SENT/ERROR,
 *   or FIN acknowledged in CLOSING --> DESTROYED (freed when the outermost
 *   engine call returns, after UTP_STATE_DESTROYING).
 *
 * Connection ids (BEP 29): the SYN carries the initiator's recv_id R; the
 * initiator sends with R + 1; the acceptor receives on R + 1 and sends with R.
 */
#include "utp_internal.h"

void utp_socket_set_addr(utp_socket *s, const struct sockaddr *a)
{
	socklen_t len = a->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
	memset(&s->addr, 0, sizeof s->addr);
	memcpy(&s->addr, a, len);
	s->addrlen = len;
}

utp_socket *utp_socket_new(utp_context *ctx)
{
	utp_socket *s = calloc(1, sizeof *s);
	if (s == NULL)
		return NULL;
	s->ctx = ctx;
	s->heap_idx = -1;
	s->state = UTPKIT_SOCK_IDLE;
	s->sndbuf = ctx->opt_sndbuf;
	s->rcvbuf = ctx->opt_rcvbuf;
	s->target_delay = ctx->opt_target_delay;
	s->last_recv = s->last_send = ctx->now;
	s->next = ctx->all;
	if (ctx->all)
		ctx->all->prev = s;
	ctx->all = s;
	ctx->counters.sockets_created++;
	ctx->counters.sockets_live++;
	if (ctx->counters.sockets_live > ctx->counters.sockets_peak)
		ctx->counters.sockets_peak = ctx->counters.sockets_live;
	return s;
}

void utp_socket_free(utp_socket *s)
{
	utp_context *ctx = s->ctx;
	utp_out_free_all(s);
	utp_in_free_all(s);
	if (s->prev)
		s->prev->next = s->next;
	else
		ctx->all = s->next;
	if (s->next)
		s->next->prev = s->prev;
	ctx->counters.sockets_freed++;
	ctx->counters.sockets_live--;
	free(s);
}

/* Takes the socket out of every table and list now; the memory goes when
 * the outermost engine call returns. */
void utp_socket_destroy_later(utp_socket *s)
{
	utp_context *ctx = s->ctx;
	utp_socket **pp;
	if (s->zombie)
		return;
	utp_accept_release(s);
	utp_table_remove(ctx, s);
	if (s->in_ack_list) {
		for (pp = &ctx->ack_list; *pp; pp = &(*pp)->ack_next) {
			if (*pp == s) {
				*pp = s->ack_next;
				break;
			}
		}
		s->in_ack_list = 0;
	}
	s->zombie = 1;
	s->state = UTPKIT_SOCK_DESTROYED;
	utp_timer_update(s);
	s->zombie_next = ctx->zombies;
	ctx->zombies = s;
}

utp_socket *utp_create_socket(utp_context *ctx)
{
	utp_socket *s;
	if (ctx == NULL)
		return NULL;
	utp_ctx_enter(ctx);
	s = utp_socket_new(ctx);
	utp_ctx_leave(ctx);
	return s;
}

int utp_connect(utp_socket *s, const struct sockaddr *to, socklen_t tolen)
{
	utp_context *ctx;
	int tries;
	uint16 isn;
	if (s == NULL || s->state != UTPKIT_SOCK_IDLE || s->zombie || !utp_addr_valid(to, tolen))
		return -1;
	ctx = s->ctx;
	utp_ctx_enter(ctx);
	utp_socket_set_addr(s, to);
	for (tries = 0; tries < 64; tries++) {
		s->recv_id = (uint16)utp_random32(ctx);
		if (utp_table_find(ctx, (struct sockaddr *)&s->addr, s->addrlen, s->recv_id) == NULL)
			break;
	}
	if (tries == 64 || utp_table_insert(ctx, s) != 0) {
		utp_ctx_leave(ctx);
		return -1;
	}
	s->send_id = (uint16)(s->recv_id + 1);
	isn = (uint16)utp_random32(ctx);
	s->syn_seq = isn;
	s->acked_seq = isn;  /* the SYN counts as acknowledged once we are connected */
	s->seq_nr = s->next_send = (uint16)(isn + 1);
	utp_mtu_init(s);
	utp_cc_init(s);
	s->state = UTPKIT_SOCK_SYN_SENT;
	s->syn_tries = 0;
	s->syn_sent = ctx->now;
	utp_out_send_syn(s);
	utp_timer_update(s);
	utp_ctx_leave(ctx);
	return 0;
}

/* A connection attempt is given up (closed, aborted or out of SYN retries).
 * If one of our SYNs arrived but the SYN-ACK was lost, the peer holds a
 * half-open socket for this connection id.  libutp never resends a SYN-ACK
 * and keeps that socket until its own timeout; Transmission meanwhile
 * closes every further connection from our address as a duplicate (seen
 * in the lab: each retry answered by SYN-ACK + FIN).  A RESET on the
 * peer's receive id (our send id) clears it, as libutp, libtorrent and our
 * acceptor all look a RESET up by that id.  One datagram, never answered. */
static void syn_abandon(utp_socket *s)
{
	if (s->state != UTPKIT_SOCK_SYN_SENT)
		return;
	s->ctx->counters.syn_abandoned++;
	utp_send_reset_to(s->ctx, (struct sockaddr *)&s->addr, s->addrlen, s->send_id, s->syn_seq, 0);
}

/* The connection failed (RESET, timeout, ICMP).  A socket the application
 * already closed goes away quietly; otherwise ON_ERROR fires once and the
 * socket waits for utp_close. */
void utp_socket_fail(utp_socket *s, int code)
{
	if (s->zombie || s->state == UTPKIT_SOCK_ERROR)
		return;
	if (s->app_closed || s->state == UTPKIT_SOCK_CLOSING) {
		utp_socket_destroy_later(s);
		return;
	}
	s->state = UTPKIT_SOCK_ERROR;
	utp_accept_release(s);
	utp_table_remove(s->ctx, s);
	utp_timer_update(s);
	utp_log(s->ctx, s, UTP_LOG_NORMAL, "error %s", utp_error_code_names[code]);
	utp_report_error(s, code);
}

void utp_socket_maybe_finish(utp_socket *s)
{
	if (!s->zombie && s->state == UTPKIT_SOCK_CLOSING && s->fin_acked) {
		utp_timewait_add(s);
		utp_socket_destroy_later(s);
	}
}

/* Earliest armed timer of the socket, 0 when none. */
uint64 utp_socket_next_deadline(const utp_socket *s)
{
	const utp_context *ctx = s->ctx;
	uint64 d = 0;
	uint64 cand[8];
	int i, n = 0;

	if (s->state == UTPKIT_SOCK_IDLE || s->state == UTPKIT_SOCK_ERROR || s->state == UTPKIT_SOCK_DESTROYED)
		return 0;
	cand[n++] = s->syn_deadline;
	cand[n++] = s->rto_deadline;
	cand[n++] = s->tlp_deadline;
	cand[n++] = s->reorder_deadline;
	cand[n++] = s->zwp_deadline;
	cand[n++] = s->pace_deadline;
	cand[n++] = s->ack_pending ? s->ack_due : 0;
	if (s->state != UTPKIT_SOCK_SYN_SENT && s->rto_deadline == 0) {
		uint64 ka = (uint64)ctx->keepalive_ms * 1000u;
		cand[n++] = s->probes_unanswered ? s->keepalive_deadline : UTP_MIN(s->last_recv, s->last_send) + ka;
	}
	for (i = 0; i < n; i++)
		if (cand[i] != 0 && (d == 0 || cand[i] < d))
			d = cand[i];
	return d;
}

static void on_keepalive(utp_socket *s)
{
	utp_context *ctx = s->ctx;
	uint64 ka = (uint64)ctx->keepalive_ms * 1000u;
	if (s->probes_unanswered > 0 || ctx->now - s->last_recv >= ka) {
		/* Nothing heard for a keepalive interval: probe.  The probe is a
		 * zero-length DATA packet with an already acknowledged sequence
		 * number, which peers answer with an ACK; a side that only receives
		 * learns this way that its peer is gone (libutp's never does). */
		if (s->probes_unanswered >= ctx->dead_retries) {
			utp_socket_fail(s, UTP_ETIMEDOUT);
			return;
		}
		s->probes_unanswered++;
		utp_out_send_keepalive(s);
		s->keepalive_deadline = ctx->now + (uint64)utp_rto_base(s) * (1u << UTP_MIN(s->probes_unanswered - 1, 6u));
	} else {
		/* We heard from the peer but sent nothing: refresh NAT mappings. */
		utp_out_send_keepalive(s);
	}
}

void utp_socket_on_timer(utp_socket *s)
{
	utp_context *ctx = s->ctx;
	uint64 now = ctx->now;

	if (s->zombie)
		return;
	if (s->state == UTPKIT_SOCK_SYN_SENT && s->syn_deadline && now >= s->syn_deadline) {
		if (s->syn_tries >= ctx->syn_retries) {
			syn_abandon(s);
			utp_socket_fail(s, UTP_ETIMEDOUT);
			return;
		}
		s->syn_tries++;
		utp_out_send_syn(s);
	} else if (s->is_acceptor && !s->confirmed && s->syn_deadline && now >= s->syn_deadline) {
		/* Data is held for an unconfirmed initiator (utp_out_flush): repeat
		 * the SYN-ACK, in case it was lost, twice; then let the data go, for
		 * an initiator that has the SYN-ACK but waits for us to speak first
		 * (our own initiators confirm with an ACK at once, and answer a
		 * repeated SYN-ACK with one). */
		if (s->syn_tries >= UTP_MIN(ctx->syn_retries, 2u)) {
			s->syn_deadline = 0;
			s->speak_unconfirmed = 1;
			utp_out_flush(s);
		} else {
			s->syn_tries++;
			if (utp_unauth_permit(ctx, (struct sockaddr *)&s->addr, s->addrlen, UTP_HEADER_SIZE,
			                      UTP_UNAUTH_OTHER))
				utp_out_send_synack(s);
			s->syn_deadline = now + ((uint64)ctx->syn_timeout_ms * 1000u << s->syn_tries);
		}
	}
	if (s->ack_pending && s->ack_due && now >= s->ack_due)
		utp_out_send_ack(s);
	if (s->rto_deadline && now >= s->rto_deadline) {
		utp_out_on_rto(s);
		if (s->zombie || s->state == UTPKIT_SOCK_ERROR)
			return;
	}
	if (s->tlp_deadline && now >= s->tlp_deadline)
		utp_out_on_tlp(s);
	if (s->reorder_deadline && now >= s->reorder_deadline) {
		s->reorder_deadline = 0;
		utp_out_detect_losses(s, 0);
		utp_out_flush(s);
	}
	if (s->pace_deadline && now >= s->pace_deadline)
		utp_out_flush(s);  /* the pacer lets the next burst go */
	if (s->zwp_deadline && now >= s->zwp_deadline) {
		s->zwp_deadline = 0;
		utp_out_flush_probe(s);
	}
	if ((s->state == UTPKIT_SOCK_CONNECTED || s->state == UTPKIT_SOCK_CLOSING) && s->rto_deadline == 0 &&
	    !s->zombie) {
		uint64 ka = (uint64)ctx->keepalive_ms * 1000u;
		uint64 due = s->probes_unanswered ? s->keepalive_deadline : UTP_MIN(s->last_recv, s->last_send) + ka;
		if (now >= due)
			on_keepalive(s);
	}
	if (!s->zombie)
		utp_timer_update(s);
}

/* ---- public socket calls ------------------------------------------------------ */

ssize_t utp_writev(utp_socket *s, struct utp_iovec *iovec, size_t num_iovecs)
{
	size_t n;
	if (s == NULL || s->zombie || (iovec == NULL && num_iovecs > 0))
		return -1;
	if (s->app_closed || s->shut_wr ||
	    (s->state != UTPKIT_SOCK_CONNECTED && s->state != UTPKIT_SOCK_SYN_SENT))
		return -1;
	if (num_iovecs > UTP_IOV_MAX)
		num_iovecs = UTP_IOV_MAX;
	utp_ctx_enter(s->ctx);
	n = utp_out_queue(s, iovec, num_iovecs);
	utp_out_flush(s);
	if (!s->zombie)
		utp_timer_update(s);
	utp_ctx_leave(s->ctx);
	return (ssize_t)n;
}

ssize_t utp_write(utp_socket *s, void *buf, size_t count)
{
	struct utp_iovec v;
	v.iov_base = buf;
	v.iov_len = count;
	return utp_writev(s, &v, 1);
}

void utp_shutdown(utp_socket *s, int how)
{
	if (s == NULL || s->zombie)
		return;
	utp_ctx_enter(s->ctx);
	if (how == SHUT_RD || how == SHUT_RDWR)
		s->shut_rd = 1;
	if ((how == SHUT_WR || how == SHUT_RDWR) && !s->shut_wr) {
		s->shut_wr = 1;
		s->want_writable = 0;
		if (s->state == UTPKIT_SOCK_CONNECTED || s->state == UTPKIT_SOCK_SYN_SENT) {
			utp_out_queue_fin(s);
			utp_out_flush(s);
			utp_timer_update(s);
		}
	}
	utp_ctx_leave(s->ctx);
}

void utp_close(utp_socket *s)
{
	if (s == NULL || s->zombie || s->app_closed)
		return;
	utp_ctx_enter(s->ctx);
	s->app_closed = 1;
	s->want_writable = 0;
	switch (s->state) {
	case UTPKIT_SOCK_CONNECTED:
		/* Queued data goes first, then FIN; the socket is freed once the
		 * FIN is acknowledged or the peer is found dead. */
		s->state = UTPKIT_SOCK_CLOSING;
		if (!s->fin_queued)
			utp_out_queue_fin(s);
		utp_out_flush(s);
		if (!s->zombie)
			utp_timer_update(s);
		utp_socket_maybe_finish(s);
		break;
	case UTPKIT_SOCK_CLOSING:
	case UTPKIT_SOCK_DESTROYED:
		break;
	default:  /* IDLE, SYN_SENT, ERROR: nothing to finish */
		syn_abandon(s);
		utp_socket_destroy_later(s);
		break;
	}
	utp_ctx_leave(s->ctx);
}

void utpkit_abort(utp_socket *s)
{
	if (s == NULL || s->zombie)
		return;
	utp_ctx_enter(s->ctx);
	/* Refusing a connection the initiator never confirmed (a full backlog,
	 * say) answers an unauthenticated SYN: that RESET is rate limited. */
	if (s->state == UTPKIT_SOCK_CONNECTED || s->state == UTPKIT_SOCK_CLOSING)
		utp_send_reset_to(s->ctx, (struct sockaddr *)&s->addr, s->addrlen, s->send_id, s->ack_nr,
		                  s->is_acceptor && !s->confirmed);
	syn_abandon(s);
	s->app_closed = 1;
	utp_socket_destroy_later(s);
	utp_ctx_leave(s->ctx);
}

int utpkit_probe(utp_socket *s)
{
	int ok = -1;
	if (s == NULL || s->zombie || s->state != UTPKIT_SOCK_CONNECTED)
		return -1;
	utp_ctx_enter(s->ctx);
	if (!s->is_acceptor || s->confirmed ||
	    utp_unauth_permit(s->ctx, (struct sockaddr *)&s->addr, s->addrlen, UTP_HEADER_SIZE, UTP_UNAUTH_OTHER)) {
		utp_out_send_keepalive(s);
		ok = 0;
	}
	utp_ctx_leave(s->ctx);
	return ok;
}

void utp_read_drained(utp_socket *s)
{
	uint32 wnd, mss;
	if (s == NULL || s->zombie || (s->state != UTPKIT_SOCK_CONNECTED && s->state != UTPKIT_SOCK_CLOSING))
		return;
	utp_ctx_enter(s->ctx);
	/* Tell the sender at once when the window reopens noticeably, so a
	 * reader that stalled does not leave the sender waiting for a probe. */
	wnd = utp_in_window(s);
	mss = utp_out_payload_max(s);
	if ((s->last_adv_wnd < mss && wnd >= mss) ||
	    (wnd > s->last_adv_wnd && wnd - s->last_adv_wnd >= UTP_MAX(2 * mss, s->rcvbuf / 4)))
		utp_out_send_ack(s);
	utp_ctx_leave(s->ctx);
}

void *utp_set_userdata(utp_socket *s, void *userdata)
{
	void *old;
	if (s == NULL)
		return NULL;
	old = s->userdata;
	s->userdata = userdata;
	return old;
}

void *utp_get_userdata(utp_socket *s) { return s ? s->userdata : NULL; }

utp_context *utp_get_context(utp_socket *s) { return s ? s->ctx : NULL; }

utp_socket_stats *utp_get_stats(utp_socket *s)
{
	if (s == NULL)
		return NULL;
	s->stats.mtu_guess = s->mtu_cur;
	return &s->stats;
}

int utp_setsockopt(utp_socket *s, int opt, int val)
{
	if (s == NULL || val <= 0)
		return -1;
	switch (opt) {
	case UTP_SNDBUF: s->sndbuf = (uint32)val; return 0;
	case UTP_RCVBUF: s->rcvbuf = (uint32)val; return 0;
	case UTP_TARGET_DELAY: s->target_delay = (uint32)val; return 0;
	default: return -1;
	}
}

int utp_getsockopt(utp_socket *s, int opt)
{
	if (s == NULL)
		return -1;
	switch (opt) {
	case UTP_SNDBUF: return (int)s->sndbuf;
	case UTP_RCVBUF: return (int)s->rcvbuf;
	case UTP_TARGET_DELAY: return (int)s->target_delay;
	default: return -1;
	}
}

int utp_getpeername(utp_socket *s, struct sockaddr *addr, socklen_t *addrlen)
{
	socklen_t n;
	if (s == NULL || addr == NULL || addrlen == NULL || s->addrlen == 0)
		return -1;
	n = UTP_MIN(*addrlen, s->addrlen);
	memcpy(addr, &s->addr, n);
	*addrlen = s->addrlen;
	return 0;
}

int utp_get_delays(utp_socket *s, uint32 *ours, uint32 *theirs, uint32 *age)
{
	if (s == NULL)
		return -1;
	if (ours)
		*ours = utp_delay_queueing(&s->our_hist);
	if (theirs)
		*theirs = utp_delay_queueing(&s->their_hist);
	if (age)
		*age = s->our_hist.nsamples ? (uint32)((s->ctx->now - s->our_hist.last_sample_time) / 1000u) : 0;
	return 0;
}

int utpkit_get_socket_info(utp_socket *s, utpkit_socket_info *info)
{
	if (s == NULL || info == NULL)
		return -1;
	memset(info, 0, sizeof *info);
	info->state = s->state;
	info->srtt_us = s->rtt_valid ? s->srtt : 0;
	info->rttvar_us = s->rttvar;
	info->rto_ms = s->rto / 1000u;
	info->cwnd = s->cwnd;
	info->ssthresh = s->ssthresh;
	info->in_flight = s->cur_window;
	info->peer_wnd = s->peer_wnd;
	info->send_queue = s->queued_bytes;
	info->reorder_bytes = s->reorder_bytes;
	info->packet_size = s->mtu_cur;
	info->our_delay_us = utp_delay_queueing(&s->our_hist);
	info->base_delay_us = utp_delay_base(&s->our_hist);
	info->timeouts = s->timeouts;
	info->loss_events = s->loss_events;
	info->slow_start = s->slow_start;
	info->seq_nr = s->seq_nr;
	info->ack_nr = s->ack_nr;
	info->peer_confirmed = s->is_acceptor ? s->confirmed : s->state != UTPKIT_SOCK_SYN_SENT && s->state != UTPKIT_SOCK_IDLE;
	return 0;
}
