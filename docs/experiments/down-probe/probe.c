/* Stream probe (docs/performance.md, 2026-12-07 20:30-21:30): GRIFFIN's quads down (768 x 576 int4, block 32,
 * fp16 scales) over ~100 MB of copies (cold) or one copy (hot), and plain reads of the same bytes with and without
 * software requests. Built by run.sh against the kernel's sources with knobs.patch (KN_* switches, env below).
 *   ./probe MODE ROWS [WIDE]   MODE 0: down cold, 2: down hot, 1: plain read, 3: read + a request AH KB ahead
 *   (PF hint 1-4), 8: AH-KB chunks in order, 9: in random order (PF 0 none, 1 whole chunk first, 2 the next
 *   chunk during this one, 3/4 per line R16PF bytes ahead), 5/6: r16 rows-dot 1536 x 576 cold / hot.
 *   env: AH (groups or KB), PF, INIT, AB (bytes ahead), HINT, PM (piece-major quads), SKIP (1: coefficients
 *   only, 2: coefficients of a call's first group only; speed only), R16PF, QPF, PIPE, FAST (see knobs.patch). */
int KN_AHEAD=2, KN_PF=1, KN_INIT=1, KN_AB=0, KN_HINT=2, KN_PM=0, KN_SKIP=0, KN_R16PF=8192, KN_QPF=0, KN_PIPE=0, KN_FAST=0;
#include "quant_gemv.c"
#include <stdio.h>
#include <sys/mman.h>
static uint64_t rd(void){ unsigned lo,hi; __asm__ volatile("rdtsc":"=a"(lo),"=d"(hi)); return ((uint64_t)hi<<32)|lo; }
static void *huge(size_t n){ void *p=NULL; posix_memalign(&p, 2<<20, (n+(2<<20)-1)&~(size_t)((2<<20)-1)); madvise(p,n,MADV_HUGEPAGE); memset(p,0,n); return p;}
int main(int argc,char**argv){
  int mode=atoi(argv[1]); if(getenv("R16PF")) KN_R16PF=atoi(getenv("R16PF")); if(getenv("SKIP")) KN_SKIP=atoi(getenv("SKIP")); if(getenv("PM")) KN_PM=atoi(getenv("PM")); if(getenv("AB")) KN_AB=atoi(getenv("AB")); if(getenv("HINT")) KN_HINT=atoi(getenv("HINT")); if(getenv("AH")) KN_AHEAD=atoi(getenv("AH")); if(getenv("FAST")) KN_FAST=atoi(getenv("FAST")); if(getenv("PIPE")) KN_PIPE=atoi(getenv("PIPE")); if(getenv("QPF")) KN_QPF=atoi(getenv("QPF")); if(getenv("PF")) KN_PF=atoi(getenv("PF")); if(getenv("INIT")) KN_INIT=atoi(getenv("INIT")); int chunk=atoi(argv[2]); int wide=argc>3?atoi(argv[3]):1;
  const int64_t R=768, C=576, NCOP=360; /* 360 x ~280 KB = 100 MB */
  QMat w={0}; w.rows=R; w.cols=C; w.block=32; w.bits=4; w.scale_fp32=0;
  uint8_t *codes=malloc(R*C/2); uint16_t *sc=malloc(R*C/32*2);
  for(int64_t i=0;i<R*C/2;i++) codes[i]=rand();
  for(int64_t i=0;i<R*C/32;i++) sc[i]=0x3c00 + (rand()&0x3ff); /* fp16 ~1..2 */
  w.codes=codes; w.scales=sc;
  int64_t qb=caprese_qa_quads_bytes(&w);
  uint8_t *buf=huge(qb*NCOP);
  caprese_qa_pack_quads(&w, buf); for(int k=1;k<NCOP;k++) memcpy(buf+k*qb, buf, qb);
  float h[1536]; for(int i=0;i<1536;i++) h[i]=(rand()%2000-1000)/1000.0f;
  float y[C]; memset(y,0,sizeof y);
  /* stream reference */
  double best=1e30, bests=1e30;
  int REPS=getenv("REPS")?atoi(getenv("REPS")):15; for(int rep=0;rep<REPS;rep++){
    uint64_t t0=rd();
    if(mode==0){
      for(int k=0;k<NCOP;k++) for(int64_t r=0;r<R;r+=chunk){ int64_t r1=r+chunk<R?r+chunk:R;
        caprese_q_rows_axpy_quads(&w, buf+k*qb, wide, h, r, r1, R, y);}
    } else if(mode==1){ /* pure read of same bytes */
      __m512i acc=_mm512_setzero_si512();
      for(int64_t o=0;o<qb*NCOP;o+=64) acc=_mm512_add_epi64(acc,_mm512_load_si512(buf+o));
      y[0]+=_mm512_reduce_add_epi64(acc);
    } else if(mode==3){ /* read + sw prefetch AH KB ahead, hint PF */
      __m512i acc=_mm512_setzero_si512(); int64_t d=KN_AHEAD*1024;
      for(int64_t o=0;o<qb*NCOP;o+=64){ if(KN_PF==2) __builtin_prefetch(buf+o+d,0,2); else if(KN_PF==3) __builtin_prefetch(buf+o+d,0,3); else if(KN_PF==1) __builtin_prefetch(buf+o+d,0,1); else if (KN_PF==4) __builtin_prefetch(buf+o+d,0,0);
        acc=_mm512_add_epi64(acc,_mm512_load_si512(buf+o));}
      y[0]+=_mm512_reduce_add_epi64(acc);
    } else if(mode==5 || mode==6){ /* r16 rows-dot over copies of a 1536x576 matrix */
      static uint8_t *rb=NULL; static QMat m2; static int64_t cb, sbb; static QgX xq; static void *xbuf;
      if(!rb){ m2.rows=1536; m2.cols=576; m2.block=32; m2.bits=4; m2.scale_fp32=0; cb=1536*288; sbb=1536*18*2;
        int64_t per=cb+sbb; rb=huge(per*NCOP*0+per*(int64_t)(96e6/per));
        for(int64_t i=0;i<per*(int64_t)(96e6/per);i++) rb[i]=rand();
        for(int64_t k=0;k<(int64_t)(96e6/per);k++){ uint16_t *ss=(uint16_t*)(rb+k*per+cb); for(int i=0;i<1536*18;i++) ss[i]=0x3c00+(rand()&0x3ff);}
        xbuf=malloc(caprese_qx_bytes(576)); m2.codes=rb; m2.scales=rb+cb; m2.layout=QG_R16; caprese_qx_quantize(&m2,h,xbuf,&xq);}
      int64_t per=cb+sbb, nc=(int64_t)(96e6/per); float yy[1536];
      for(int64_t k=0;k<nc;k++){ m2.codes=rb+(mode==6?0:k*per); m2.scales=m2.codes+cb; for(int64_t r=0;r<1536;r+=chunk){int64_t r1=r+chunk<1536?r+chunk:1536; qx_r16_rows(&m2,&xq,NULL,r,r1,yy);} }
      y[1]+=yy[5];
      if(rep==REPS-1) { printf("r16: %.1f MB ", per*nc/1e6); qb = per; }
    } else if(mode==8){ /* chunks of AH KB: PF=1 bulk-prefetch the chunk then read; PF=2 bulk-prefetch next chunk while reading this; 0 none */
      __m512i acc=_mm512_setzero_si512(); int64_t cs=KN_AHEAD*1024, tot=qb*NCOP/cs*cs;
      for(int64_t o=0;o<tot;o+=cs){
        if(KN_PF==1) qg_prefetch(buf+o,cs); else if(KN_PF==2 && o+cs<tot) qg_prefetch(buf+o+cs,cs); else if (KN_PF==2 && o==0) qg_prefetch(buf,cs);
        for(int64_t k=0;k<cs;k+=64) acc=_mm512_add_epi64(acc,_mm512_load_si512(buf+o+k));
        if (KN_SKIP) { uint64_t t=rd(); while(rd()-t<(uint64_t)KN_SKIP); }
      }
      y[0]+=_mm512_reduce_add_epi64(acc);
    } else if(mode==9){ /* random order chunks of AH KB */
      __m512i acc=_mm512_setzero_si512(); int64_t cs=KN_AHEAD*1024, n=qb*NCOP/cs; static int64_t *perm=NULL;
      if(!perm){ perm=malloc(n*8); for(int64_t i=0;i<n;i++) perm[i]=i; for(int64_t i=n-1;i>0;i--){int64_t j=rand()%(i+1), t=perm[i]; perm[i]=perm[j]; perm[j]=t;} }
      for(int64_t i=0;i<n;i++){ const uint8_t *c=buf+perm[i]*cs;
        if(KN_PF==4){ const uint8_t *nx = i+1<n ? buf+perm[i+1]*cs : NULL; int64_t D=KN_R16PF; if(i==0) qg_prefetch(c, D);
          for(int64_t k=0;k<cs;k+=64){ int64_t t=k+D; const uint8_t *pp = t<cs ? c+t : (nx && t-cs<cs ? nx+(t-cs) : NULL); if(pp) __builtin_prefetch(pp,0,2); acc=_mm512_add_epi64(acc,_mm512_load_si512(c+k));}
          continue; }
        if(KN_PF==1) qg_prefetch(c,cs); else if(KN_PF==2){ if(i+1<n) qg_prefetch(buf+perm[i+1]*cs,cs); if(i==0) qg_prefetch(c,cs);} else if(KN_PF==3) qg_prefetch(c, KN_R16PF);
        for(int64_t k=0;k<cs;k+=64){ if(KN_PF==3) __builtin_prefetch(c+k+KN_R16PF,0,2); acc=_mm512_add_epi64(acc,_mm512_load_si512(c+k));}
      }
      y[0]+=_mm512_reduce_add_epi64(acc);
    } else if(mode==2){ /* hot: one copy */
      for(int k=0;k<NCOP;k++) for(int64_t r=0;r<R;r+=chunk){ int64_t r1=r+chunk<R?r+chunk:R;
        caprese_q_rows_axpy_quads(&w, buf, wide, h, r, r1, R, y);}
    }
    uint64_t t1=rd(); double s=(t1-t0)/2.596e9; if(s<best)best=s;
  }
  if(mode>=5) printf("(per %ld, %ld copies) ", (long)qb, (long)(96e6/qb)); printf("mode %d chunk %d wide %d: %.3f ms  %.1f GB/s (per copy %.2f us)\n",mode,chunk,wide,best*1e3,(mode>=5? (double)qb*(int64_t)(96e6/qb): (double)qb*NCOP)/best/1e9,best*1e6/NCOP);
  return 0;
}
